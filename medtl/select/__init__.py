"""Backbone selection: transferability scores and a selector."""

from medtl.select.scores import linear_probe_auc, logme
from medtl.select.selector import BackboneSelector

__all__ = ["BackboneSelector", "linear_probe_auc", "logme"]
