"""The one training core: :func:`fit` plus objectives and safetensors checkpoints."""

from medtl.train.core import FitResult, fit, select_device, seed_everything
from medtl.train.objectives import (
    AdaptationLoss,
    DomainFeatures,
    NoAdaptation,
    Objective,
    Supervised,
    TaskWithAdaptation,
    balanced_class_weights,
)

__all__ = ["AdaptationLoss", "DomainFeatures", "FitResult", "NoAdaptation", "Objective", "Supervised",
           "TaskWithAdaptation", "balanced_class_weights", "fit", "seed_everything", "select_device"]
