"""Cross-hospital adaptation: loss plugins for :class:`medtl.train.TaskWithAdaptation`, and AdaBN.

Adding a method is one file holding an :class:`~medtl.train.objectives.AdaptationLoss`; its maths
goes in :mod:`medtl.adapt.functional`.
"""

from medtl.adapt.coral import CoralLoss
from medtl.adapt.dann import DANNLoss, gradient_reversal
from medtl.adapt.functional import coral_loss, recompute_batchnorm_statistics
from medtl.train.objectives import NoAdaptation

__all__ = ["CoralLoss", "DANNLoss", "NoAdaptation", "coral_loss", "gradient_reversal",
           "recompute_batchnorm_statistics"]
