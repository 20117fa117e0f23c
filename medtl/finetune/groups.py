"""Freezing and layer-wise learning rates: one mechanism over the backbone's layer groups.

A backbone lists its parameters in ordered groups (stem → … → classifier). Group *i* of *G* is
either frozen (``i < freeze``) or trained at ``lr × layer_decay^(G−1−i)`` — so ``freeze=0,
layer_decay=1`` is full fine-tuning, ``freeze="all"`` is a linear probe, and ``layer_decay<1`` is
layer-wise learning-rate decay (as in BEiT / ELECTRA fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, for 1D/2D/3D inputs.

    A frozen layer must not keep adapting its running statistics while the rest trains, which a
    plain BatchNorm in train mode would do even with ``requires_grad=False``.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.eps = bn.eps
        n = bn.num_features
        weight = bn.weight.detach().clone() if bn.affine else bn.running_mean.new_ones(n)
        bias = bn.bias.detach().clone() if bn.affine else bn.running_mean.new_zeros(n)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        if bn.num_batches_tracked is not None:  # kept so state dicts stay interchangeable with BatchNorm
            self.register_buffer("num_batches_tracked", bn.num_batches_tracked.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


@dataclass
class GroupPlan:
    """What :func:`optimizer_groups` did: frozen group count and parameter counts."""

    n_groups: int
    frozen_groups: int
    trainable_params: int
    total_params: int


def optimizer_groups(model: nn.Module, lr: float, *, freeze: int | Literal["all"] = 0,
                     layer_decay: float = 1.0) -> tuple[list[dict], GroupPlan]:
    """Freeze the first ``freeze`` layer groups and return optimizer parameter groups for the rest.

    The classifier (the last group) is never frozen, so ``freeze="all"`` trains only the head.

    Args:
        model: a :class:`~medtl.models.Backbone` (anything with ``layer_groups() -> list[list[str]]``).
        lr: learning rate of the last (classifier) group.
        freeze: number of leading groups to freeze, or ``"all"``.
        layer_decay: per-group learning-rate multiplier towards the input, in (0, 1].

    Returns:
        ``(param_groups, plan)`` — pass ``param_groups`` to :func:`medtl.train.fit`.
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    groups = model.layer_groups()
    n_groups = len(groups)
    n_frozen = n_groups - 1 if freeze == "all" else int(freeze)
    if n_frozen < 0:
        raise ValueError(f"freeze must be >= 0 or 'all', got {freeze}")
    n_frozen = min(n_frozen, n_groups - 1)
    params = dict(model.named_parameters())
    total_params = sum(p.numel() for p in params.values())
    frozen_names = {name for group in groups[:n_frozen] for name in group}
    for name in frozen_names:
        params[name].requires_grad_(False)
    _freeze_batchnorm(model, frozen_names)
    param_groups = []
    for i, names in enumerate(groups[n_frozen:], start=n_frozen):
        trainable = [params[n] for n in names if params[n].requires_grad]
        if trainable:
            param_groups.append({"params": trainable, "lr": lr * layer_decay ** (n_groups - 1 - i), "group": i})
    plan = GroupPlan(n_groups=n_groups, frozen_groups=n_frozen,
                     trainable_params=sum(p.numel() for g in param_groups for p in g["params"]),
                     total_params=total_params)
    return param_groups, plan


def _freeze_batchnorm(model: nn.Module, frozen_names: set[str]) -> None:
    """Swap every BatchNorm whose parameters are all frozen for a :class:`FrozenBatchNorm`."""
    for module_name, module in list(model.named_modules()):
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        own = [f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
        if own and all(name in frozen_names for name in own):
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, FrozenBatchNorm(module))
