"""Cross-hospital adaptation: loss plugins for :class:`medtl.train.TaskWithAdaptation`, AdaBN and TENT.

Adding a method is one file holding an :class:`~medtl.train.objectives.AdaptationLoss`; its maths
goes in :mod:`medtl.adapt.functional`.
"""

from medtl.adapt.coral import CoralLoss
from medtl.adapt.dann import DANNLoss, gradient_reversal
from medtl.adapt.functional import (
    coral_loss,
    exact_ot_plan,
    fixmatch_loss,
    jdot_cost,
    median_heuristic_bandwidths,
    mk_mmd,
    ot_alignment_loss,
    prediction_entropy,
    recompute_batchnorm_statistics,
)
from medtl.adapt.mmd import MMDLoss
from medtl.adapt.ot import OTAlignmentLoss
from medtl.adapt.pseudo_label import PseudoLabelLoss
from medtl.adapt.tent import EntropyMinimisation, tent_parameters
from medtl.train.objectives import NoAdaptation

__all__ = ["CoralLoss", "DANNLoss", "EntropyMinimisation", "MMDLoss", "NoAdaptation", "OTAlignmentLoss",
           "PseudoLabelLoss", "coral_loss", "exact_ot_plan", "fixmatch_loss", "gradient_reversal", "jdot_cost",
           "median_heuristic_bandwidths", "mk_mmd", "ot_alignment_loss", "prediction_entropy",
           "recompute_batchnorm_statistics", "tent_parameters"]
