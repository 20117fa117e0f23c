"""Freezing and layer-wise learning rates: one mechanism over the backbone's layer groups.

A backbone lists its parameters in ordered groups (stem → … → classifier). Group *i* of *G* is
either frozen (``i < freeze``) or trained at ``lr × layer_decay^(G−1−i)`` — so ``freeze=0,
layer_decay=1`` is full fine-tuning, ``freeze="all"`` is a linear probe, and ``layer_decay<1`` is
layer-wise learning-rate decay (as in BEiT / ELECTRA fine-tuning).

Freezing is reversible: a frozen group keeps its parameters (``requires_grad=False``) and its
BatchNorm layers become :class:`FrozenBatchNorm` holding the *same* ``nn.Parameter`` objects, so
:func:`unfreeze_groups` can hand the group back to an optimizer that already holds it (gradual
unfreezing, LP-FT's second phase).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed running statistics, for 1D/2D/3D inputs (and timm's ``BatchNormAct``).

    A frozen layer must not keep adapting its running statistics while the rest trains, which a
    plain BatchNorm in train mode would do even with ``requires_grad=False``. The layer normalises with
    its running statistics in train and eval mode alike. A timm ``BatchNormAct2d``'s ``drop`` and ``act``
    modules are kept and applied after the normalisation, as the original does. The state dict has the
    BatchNorm's keys, so state dicts stay interchangeable.

    Args:
        bn: the BatchNorm to freeze (a ``torch.nn.modules.batchnorm._BatchNorm``).
        keep_parameters: ``False`` (default): ``weight`` and ``bias`` are copied into buffers, so the
            layer is entirely fixed. ``True``: they stay the BatchNorm's own ``nn.Parameter`` objects, so an
            optimizer that holds them keeps working and their ``requires_grad`` decides whether the affine
            part trains (statistics fixed, affine trainable is the common choice, see
            :func:`medtl.finetune.apply_batchnorm_policy`).

    Shapes:
        ``forward``: ``(B, C, *S)`` → ``(B, C, *S)``.

    Examples:
        >>> frozen = FrozenBatchNorm(model.stem[1], keep_parameters=True)
        >>> model.stem[1] = frozen
        >>> model.stem[1] = frozen.unfreeze()  # the original BatchNorm, with the current values
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, *, keep_parameters: bool = False) -> None:
        super().__init__()
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"FrozenBatchNorm wraps a BatchNorm layer, got {type(bn).__name__}")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("this BatchNorm keeps no running statistics (track_running_stats=False, e.g. after "
                             "tent_parameters), so there is nothing to freeze; rebuild it with running statistics")
        self.eps = bn.eps
        self.keep_parameters = keep_parameters
        n = bn.num_features
        if keep_parameters and bn.affine:
            self.weight = bn.weight
            self.bias = bn.bias
        else:
            weight = bn.weight.detach().clone() if bn.affine else bn.running_mean.new_ones(n)
            bias = bn.bias.detach().clone() if bn.affine else bn.running_mean.new_zeros(n)
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        if bn.num_batches_tracked is not None:  # kept so state dicts stay interchangeable with BatchNorm
            self.register_buffer("num_batches_tracked", bn.num_batches_tracked.detach().clone())
        for name in ("drop", "act"):  # timm's BatchNormAct2d: normalise, then dropout and activation
            module = getattr(bn, name, None)
            if isinstance(module, nn.Module):
                self.add_module(name, module)
        # The original layer, unregistered (no state-dict entries), so unfreeze() can give it back.
        object.__setattr__(self, "_source", bn)

    def forward(self, x: Tensor) -> Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if "drop" in self._modules:
            x = self.drop(x)
        if "act" in self._modules:
            x = self.act(x)
        return x

    def unfreeze(self) -> nn.modules.batchnorm._BatchNorm:
        """The original BatchNorm, carrying this layer's current statistics and affine values.

        With ``keep_parameters=True`` its ``weight`` / ``bias`` are the very parameters this layer held,
        so optimizers holding them are unaffected.

        Returns:
            The BatchNorm this layer was built from, in this layer's train/eval mode; put it back in place
            of this module.
        """
        bn: nn.modules.batchnorm._BatchNorm = self._source
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if name in self._buffers:
                setattr(bn, name, self._buffers[name])
        if bn.affine:
            if self.keep_parameters:
                bn.weight, bn.bias = self.weight, self.bias
            else:
                with torch.no_grad():
                    bn.weight.data = self.weight.detach().clone()
                    bn.bias.data = self.bias.detach().clone()
        return bn.train(self.training)

    def extra_repr(self) -> str:
        return f"{self.running_mean.numel()}, eps={self.eps}, keep_parameters={self.keep_parameters}"


@dataclass
class GroupPlan:
    """What :func:`optimizer_groups` did: frozen group count and parameter counts."""

    n_groups: int
    frozen_groups: int
    trainable_params: int
    total_params: int


def optimizer_groups(model: nn.Module, lr: float, *, freeze: int | Literal["all"] = 0,
                     layer_decay: float = 1.0, include_frozen: bool = False) -> tuple[list[dict], GroupPlan]:
    """Freeze the first ``freeze`` layer groups and return optimizer parameter groups for the rest.

    The classifier (the last group) is never frozen, so ``freeze="all"`` trains only the head. Frozen
    parameters get ``requires_grad=False`` and the BatchNorm layers of frozen groups become
    :class:`FrozenBatchNorm` (statistics fixed too), keeping their parameter objects so that
    :func:`unfreeze_groups` can undo it.

    Args:
        model: a :class:`~medtl.models.Backbone` (anything with ``layer_groups() -> list[list[str]]``).
        lr: learning rate of the last (classifier) group.
        freeze: number of leading groups to freeze, or ``"all"``.
        layer_decay: per-group learning-rate multiplier towards the input, in (0, 1].
        include_frozen: also return groups for the frozen groups (every parameter of every group, at its
            decayed rate). Parameters with ``requires_grad=False`` get no gradient, and torch optimizers skip
            parameters without one, so they stay untouched until :func:`unfreeze_groups` (e.g. from
            :class:`~medtl.finetune.GradualUnfreezing`) makes them trainable; the optimizer then already
            holds them, and checkpoints resume with the same optimizer layout.

    Returns:
        ``(param_groups, plan)`` — pass ``param_groups`` to :func:`medtl.train.fit`. Each group has
        ``params``, ``lr`` and ``group`` (its index in ``model.layer_groups()``).

    Examples:
        >>> groups, plan = optimizer_groups(model, 1e-3, freeze=2, layer_decay=0.7)
        >>> fit(model, Supervised(), loader, cfg, param_groups=groups)
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
    first = 0 if include_frozen else n_frozen
    for i, names in enumerate(groups[first:], start=first):
        members = [params[n] for n in names if include_frozen or params[n].requires_grad]
        if members:
            param_groups.append({"params": members, "lr": lr * layer_decay ** (n_groups - 1 - i), "group": i})
    plan = GroupPlan(n_groups=n_groups, frozen_groups=n_frozen,
                     trainable_params=sum(p.numel() for g in param_groups for p in g["params"] if p.requires_grad),
                     total_params=total_params)
    return param_groups, plan


def unfreeze_groups(model: nn.Module, groups: int | Literal["all"] = "all") -> int:
    """Make the last ``groups`` layer groups trainable again: the inverse of :func:`optimizer_groups`' freezing.

    Their parameters get ``requires_grad=True`` and their :class:`FrozenBatchNorm` layers become the
    original BatchNorm layers again (running statistics update in train mode). Groups below stay as they
    are; nothing is ever frozen here.

    Args:
        model: anything with ``layer_groups()``, frozen by :func:`optimizer_groups`.
        groups: how many groups, counted from the classifier, must be trainable; ``"all"`` = every group.

    Returns:
        The number of parameter elements that were frozen and are trainable now.

    Examples:
        >>> groups, _ = optimizer_groups(model, 1e-3, freeze="all", include_frozen=True)
        >>> unfreeze_groups(model, 2)  # classifier + the last stage
    """
    layer_groups = model.layer_groups()
    n = len(layer_groups) if groups == "all" else int(groups)
    if n < 0:
        raise ValueError(f"groups must be >= 0 or 'all', got {groups}")
    names = {name for group in layer_groups[max(0, len(layer_groups) - n):] for name in group}
    params = dict(model.named_parameters())
    thawed = 0
    for name in names:
        if not params[name].requires_grad:
            params[name].requires_grad_(True)
            thawed += params[name].numel()
    _unfreeze_batchnorm(model, lambda own: bool(own) and all(name in names for name in own))
    return thawed


def _freeze_batchnorm(model: nn.Module, frozen_names: set[str]) -> None:
    """Swap every BatchNorm whose parameters are all frozen for a :class:`FrozenBatchNorm` (same parameters)."""
    _swap_batchnorm(model, lambda own: bool(own) and all(name in frozen_names for name in own))


def _swap_batchnorm(model: nn.Module, select: Callable[[list[str]], bool], keep_parameters: bool = True) -> int:
    """Replace each BatchNorm for which ``select(own parameter names)`` holds by a :class:`FrozenBatchNorm`."""
    swapped = 0
    for module_name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and select(_own_names(module_name, module)):
            _replace(model, module_name, FrozenBatchNorm(module, keep_parameters=keep_parameters))
            swapped += 1
    return swapped


def _unfreeze_batchnorm(model: nn.Module, select: Callable[[list[str]], bool]) -> int:
    """Give back the original BatchNorm of each :class:`FrozenBatchNorm` for which ``select(own names)`` holds."""
    restored = 0
    for module_name, module in list(model.named_modules()):
        if isinstance(module, FrozenBatchNorm) and select(_own_names(module_name, module)):
            _replace(model, module_name, module.unfreeze())
            restored += 1
    return restored


def _own_names(module_name: str, module: nn.Module) -> list[str]:
    return [f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters(recurse=False)]


def _replace(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
