"""Cross-hospital adaptation: loss plugins for :class:`medtl.train.TaskWithAdaptation`, AdaBN and TENT.

Adding a method is one file holding an :class:`~medtl.train.objectives.AdaptationLoss`, its maths in
:mod:`medtl.adapt.functional`, and its name in :data:`LOSS_PLUGINS`. AdaBN and TENT change the model
without a source batch, so they are procedures (:func:`recompute_batchnorm_statistics`,
:class:`EntropyMinimisation`) rather than plugins.
"""

from collections.abc import Callable

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
from medtl.train.objectives import AdaptationLoss, NoAdaptation

LOSS_PLUGINS: dict[str, Callable[[int], AdaptationLoss]] = {
    "source_only": lambda embedding_dim: NoAdaptation(),
    "coral": lambda embedding_dim: CoralLoss(),
    "mmd": lambda embedding_dim: MMDLoss(),
    "dann": lambda embedding_dim: DANNLoss(embedding_dim),
    "ot": lambda embedding_dim: OTAlignmentLoss(),
    "pseudo_label": lambda embedding_dim: PseudoLabelLoss(),
}
"""Adaptation loss plugins by config name, each built from the backbone's embedding size."""


def build_adaptation_loss(name: str, embedding_dim: int) -> AdaptationLoss:
    """The loss plugin called ``name`` (a key of :data:`LOSS_PLUGINS`) for a backbone of ``embedding_dim`` features.

    Examples:
        >>> build_adaptation_loss("mmd", 1280)
        MMDLoss()
    """
    if name not in LOSS_PLUGINS:
        raise ValueError(f"unknown adaptation loss {name!r}; choose one of {sorted(LOSS_PLUGINS)} "
                         "(adabn and tent are not losses: run_adapt handles them itself)")
    return LOSS_PLUGINS[name](embedding_dim)

__all__ = ["LOSS_PLUGINS", "build_adaptation_loss", "CoralLoss", "DANNLoss", "EntropyMinimisation", "MMDLoss", "NoAdaptation", "OTAlignmentLoss",
           "PseudoLabelLoss", "coral_loss", "exact_ot_plan", "fixmatch_loss", "gradient_reversal", "jdot_cost",
           "median_heuristic_bandwidths", "mk_mmd", "ot_alignment_loss", "prediction_entropy",
           "recompute_batchnorm_statistics", "tent_parameters"]
