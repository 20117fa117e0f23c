"""TENT: test-time adaptation of BatchNorm affine parameters by entropy minimisation.

Reference: Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021.

TENT is not an :class:`~medtl.train.objectives.AdaptationLoss` (it sees no source batch); it is an
objective of its own, trained through the one loop on unlabeled target batches::

    params = tent_parameters(model)
    fit(model, EntropyMinimisation(), target_loader, cfg, param_groups=[{"params": params}])

Interaction with :func:`medtl.train.fit`: ``fit`` calls ``model.train()`` every epoch and
``model.eval()`` at the end. With the default ``track_target_statistics=False``,
:func:`tent_parameters` removes every BatchNorm's running statistics (as the reference code does), so
BatchNorm normalises with the current batch's statistics in *both* modes: ``train()``/``eval()`` no
longer matter to it (they still switch other layers, e.g. dropout is active during ``fit``). The
adapted model then predicts with batch statistics at test time too — predictions depend on the batch
(feed batches of several target images), and its ``state_dict`` has no ``running_mean`` /
``running_var`` / ``num_batches_tracked`` entries (load it with ``strict=False``, or into a model
prepared by :func:`tent_parameters` as well).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from medtl.adapt.functional import prediction_entropy
from medtl.train.objectives import Objective


def tent_parameters(model: nn.Module, track_target_statistics: bool = False) -> list[nn.Parameter]:
    """Prepare ``model`` for TENT and return the parameters it trains: the BatchNorm affine weights and biases.

    Every other parameter gets ``requires_grad = False``. BatchNorm layers are set to normalise with
    batch statistics (see the module docstring for how that meets ``fit``'s ``model.train()``).

    Args:
        model: modified in place; needs BatchNorm layers with ``affine=True``.
        track_target_statistics: ``False`` (TENT as published): running statistics are removed, BatchNorm
            always uses the current batch's. ``True``: running statistics are kept and reset; in train mode
            (inside ``fit``) BatchNorm uses batch statistics and accumulates a running average of the target
            batches (cumulative, ``momentum=None``), which eval mode then uses (as AdaBN). The
            ``state_dict`` keeps its keys.

    Returns:
        The BatchNorm ``weight`` and ``bias`` parameters, in module order (2 per layer).

    Examples:
        >>> params = tent_parameters(model)
        >>> fit(model, EntropyMinimisation(), target_loader, cfg, param_groups=[{"params": params}])
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not any(m.affine for m in norms):
        raise ValueError(f"TENT trains BatchNorm affine parameters, and {type(model).__name__} has "
                         f"{'no BatchNorm layer' if not norms else 'only BatchNorm layers with affine=False'}; "
                         "use a backbone with BatchNorm (ResNet, EfficientNet), not one with LayerNorm/GroupNorm")
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for m in norms:
        if track_target_statistics:
            if m.running_mean is None:  # a layer built (or prepared) without running statistics
                device = m.weight.device if m.affine else None
                m.register_buffer("running_mean", torch.zeros(m.num_features, device=device))
                m.register_buffer("running_var", torch.ones(m.num_features, device=device))
                m.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
            m.track_running_stats = True
            m.reset_running_stats()
            m.momentum = None
        else:
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
        if m.affine:
            for p in (m.weight, m.bias):
                p.requires_grad_(True)
                params.append(p)
    return params


class EntropyMinimisation(Objective):
    """TENT's objective: the mean Shannon entropy of the model's predictions on unlabeled target images.

    ``forward(model, batch)`` reads only ``batch["image"]`` (B, C, *spatial); labels, if any, are ignored.
    Train only the parameters returned by :func:`tent_parameters`, otherwise entropy minimisation is
    free to collapse the whole network onto one class.

    Returns (from ``forward``):
        ``(loss, {"loss": float})`` with the scalar mean entropy in nats, in [0, log num_classes].

    Examples:
        >>> params = tent_parameters(model)
        >>> fit(model, EntropyMinimisation(), target_loader, cfg, param_groups=[{"params": params}])
    """

    def forward(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        if "image" not in batch:
            raise ValueError(f"EntropyMinimisation takes target-only batches {{'image': (B, C, *spatial)}}, got keys "
                             f"{sorted(batch)}; pass the target hospital's loader, not a PairedLoader")
        loss = prediction_entropy(model(batch["image"])).mean()
        return loss, {"loss": loss.item()}
