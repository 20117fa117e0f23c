"""Cross-hospital adaptation: loss plugins for :class:`medtl.train.TaskWithAdaptation`, AdaBN and TENT.

Adding a method is one file holding an :class:`~medtl.train.objectives.AdaptationLoss`, its maths in
:mod:`medtl.adapt.functional`, and its name in :data:`LOSS_PLUGINS`. AdaBN and TENT change the model
without a source batch, so they are procedures (:func:`recompute_batchnorm_statistics`,
:class:`EntropyMinimisation`) rather than plugins.
"""

import inspect
from typing import Any

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

LOSS_PLUGINS: dict[str, type[AdaptationLoss]] = {
    "source_only": NoAdaptation,
    "coral": CoralLoss,
    "mmd": MMDLoss,
    "dann": DANNLoss,
    "ot": OTAlignmentLoss,
    "pseudo_label": PseudoLabelLoss,
}
"""Adaptation loss plugins by config name. A plugin whose ``__init__`` takes ``embedding_dim`` gets the
backbone's embedding size from :func:`build_adaptation_loss`; its other arguments are its settings."""


def plugin_settings(name: str) -> list[str]:
    """The settings (``__init__`` arguments) of loss plugin ``name`` that a config may set.

    Examples:
        >>> plugin_settings("pseudo_label")
        ['threshold']
    """
    return [p.name for p in inspect.signature(_plugin(name)).parameters.values()
            if p.name != "embedding_dim" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def build_adaptation_loss(name: str, embedding_dim: int, **settings: Any) -> AdaptationLoss:
    """The loss plugin called ``name`` (a key of :data:`LOSS_PLUGINS`) for a backbone of ``embedding_dim`` features.

    Args:
        name: the plugin's config name.
        embedding_dim: D of the backbone's (B, D) pooled features.
        **settings: the plugin's own arguments (:func:`plugin_settings`), e.g. ``threshold=0.9`` for
            ``pseudo_label``; the plugin checks their values.

    Raises:
        ValueError: unknown plugin, unknown setting (the message lists the known ones) or a bad value.

    Examples:
        >>> build_adaptation_loss("mmd", 1280)
        MMDLoss()
        >>> build_adaptation_loss("pseudo_label", 1280, threshold=0.9).threshold
        0.9
    """
    cls, accepted = _plugin(name), plugin_settings(name)
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise ValueError(f"adaptation loss {name!r} has no setting {', '.join(map(repr, unknown))}; its settings are "
                         f"{accepted or 'none'}")
    if "embedding_dim" in inspect.signature(cls).parameters:
        settings = {**settings, "embedding_dim": embedding_dim}
    return cls(**settings)


def _plugin(name: str) -> type[AdaptationLoss]:
    if name not in LOSS_PLUGINS:
        raise ValueError(f"unknown adaptation loss {name!r}; choose one of {sorted(LOSS_PLUGINS)} "
                         "(adabn and tent are not losses: run_adapt handles them itself)")
    return LOSS_PLUGINS[name]


from medtl.adapt.label_shift import LabelShiftEstimator, bbse_prior, em_prior, prior_corrected  # noqa: E402

__all__ = ["LOSS_PLUGINS", "LabelShiftEstimator", "bbse_prior", "em_prior", "prior_corrected", "build_adaptation_loss", "plugin_settings", "CoralLoss", "DANNLoss", "EntropyMinimisation",
           "MMDLoss", "NoAdaptation", "OTAlignmentLoss", "PseudoLabelLoss", "coral_loss", "exact_ot_plan",
           "fixmatch_loss", "gradient_reversal", "jdot_cost", "median_heuristic_bandwidths", "mk_mmd",
           "ot_alignment_loss", "prediction_entropy", "recompute_batchnorm_statistics", "tent_parameters"]
