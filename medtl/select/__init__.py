"""Backbone selection: transferability scores, the selector, and the validation of its choice."""

from medtl.select.scores import h_score, knn_accuracy, knn_cv_accuracy, leep, linear_probe_auc, logme, nce
from medtl.select.selector import SCORES, BackboneSelector
from medtl.select.validation import validate_selection

__all__ = ["SCORES", "BackboneSelector", "h_score", "knn_accuracy", "knn_cv_accuracy", "leep", "linear_probe_auc",
           "logme", "nce", "validate_selection"]

from medtl.select.unsupervised import (UNSUPERVISED_SCORES, UnsupervisedSelector, dev_risk, dev_score, entropy_score,
                                       importance_weights, iwcv_risk, iwcv_score, per_sample_cross_entropy,
                                       prediction_entropy, snd_score)

__all__ += ["UNSUPERVISED_SCORES", "UnsupervisedSelector", "dev_risk", "dev_score", "entropy_score",
            "importance_weights", "iwcv_risk", "iwcv_score", "per_sample_cross_entropy", "prediction_entropy",
            "snd_score"]

from medtl.select.target_aware import TargetAwareRanker, feature_divergence, probe_on_target, ranking_agreement

__all__ += ["TargetAwareRanker", "feature_divergence", "probe_on_target", "ranking_agreement"]
