"""Fine-tuning strategies, all through the one loop :func:`medtl.train.fit` and the layer groups of
:mod:`medtl.finetune.groups`.

* :class:`EarlyStopping` — a callback that ends ``fit`` when a validation metric stops improving.
* :class:`GradualUnfreezing` — ULMFiT's schedule: one more layer group trains every few epochs.
* :func:`lp_ft` — linear probe, then full fine-tuning from the probed head (LP-FT).
* :class:`L2SP` — an objective wrapper pulling the weights towards their pretrained values.
* :func:`apply_batchnorm_policy` — BatchNorm statistics trained, frozen, or re-estimated (AdaBN) and frozen.
* :class:`LoRALinear`, :class:`LoRAConv`, :func:`add_lora`, :func:`merge_lora` — low-rank adapters.
* :func:`trainable_parameter_report` and :func:`negative_transfer` — numbers a report prints.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from medtl.adapt.functional import recompute_batchnorm_statistics
from medtl.config import TrainConfig
from medtl.finetune.groups import (
    FrozenBatchNorm,
    _own_names,
    _replace,
    _swap_batchnorm,
    _unfreeze_batchnorm,
    optimizer_groups,
    unfreeze_groups,
)
from medtl.train.core import STOP_TRAINING, EpochCallback, FitResult, fit, run_fingerprint
from medtl.train.objectives import Objective

log = logging.getLogger("medtl.finetune")

__all__ = ["EarlyStopping", "GradualUnfreezing", "L2SP", "LPFTResult", "LoRAConv", "LoRALinear", "add_lora",
           "apply_batchnorm_policy", "lp_ft", "merge_lora", "negative_transfer", "trainable_parameter_report"]


# --------------------------------------------------------------------------------------------- early stopping


class EarlyStopping:
    """Stop :func:`~medtl.train.fit` when a validation metric has not improved for ``patience`` epochs.

    A callback: list it in ``fit(..., callbacks=[validate, early])`` *after* the callback that writes
    ``logs[monitor]``. When the metric has not improved by more than ``min_delta`` for ``patience``
    consecutive epochs it sets ``logs["stop_training"] = True`` and ``fit`` ends after that epoch. With
    ``restore_best`` it keeps a CPU copy of the best epoch's ``state_dict`` and loads it back in ``fit``'s
    end hook (``on_fit_end``), which runs after the last epoch — stopped or not — and before the final
    checkpoint, so the returned model and the checkpoint both hold the best weights.

    Resuming: ``on_fit_start`` rebuilds the best value and the patience counter from the resumed history,
    so the stopping epoch is the same as without the interruption. The best weights are kept in memory
    only: if the best epoch is the resumed checkpoint's epoch they are taken from the resumed model;
    if it is an earlier one they are lost, and unless a later epoch improves on it, the last weights are
    kept (with a warning).

    Args:
        monitor: key of the epoch logs to watch, e.g. ``"val_auc"`` or ``"val_loss"``.
        mode: ``"max"`` (higher is better) or ``"min"``.
        patience: epochs without improvement before stopping, >= 1.
        min_delta: an improvement must exceed this, >= 0.
        restore_best: load the best epoch's weights back at the end of training.

    Attributes:
        best: best monitored value so far (``None`` before the first epoch).
        best_epoch: its 1-based epoch.
        stopped_epoch: 1-based epoch after which it stopped training, or ``None``.

    Examples:
        >>> early = EarlyStopping("val_auc", mode="max", patience=3)
        >>> result = fit(model, Supervised(), loader, cfg, callbacks=[validate, early])
        >>> result.stopped_epoch, early.best_epoch
    """

    def __init__(self, monitor: str = "val_auc", mode: Literal["max", "min"] = "max", patience: int = 3,
                 min_delta: float = 0.0, restore_best: bool = True) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must name a key of the epoch logs, e.g. 'val_auc', got {monitor!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' (e.g. AUC) or 'min' (e.g. loss), got {mode!r}")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1 (epochs without improvement), got {patience!r}")
        if not min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.restore_best = restore_best
        self._reset()

    def _reset(self) -> None:
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self.wait = 0
        self._best_state: dict[str, Tensor] | None = None

    def _update(self, logs: dict) -> bool:
        """Count one epoch's ``logs``; returns whether it improved on the best value."""
        if self.monitor not in logs:
            raise KeyError(f"EarlyStopping monitors {self.monitor!r}, but the epoch logs only have {sorted(logs)}; "
                           "list the callback that computes it before EarlyStopping in fit(callbacks=[...])")
        value = float(logs[self.monitor])
        if math.isfinite(value) and (self.best is None or (value > self.best + self.min_delta if self.mode == "max"
                                                           else value < self.best - self.min_delta)):
            self.best, self.best_epoch, self.wait = value, int(logs["epoch"]), 0
            return True
        self.wait += 1
        return False

    def _snapshot(self, model: nn.Module) -> None:
        self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def on_fit_start(self, model: nn.Module, history: list[dict]) -> None:
        """Start afresh, or rebuild the counters from a resumed run's ``history``."""
        self._reset()
        for logs in history:
            self._update(logs)
        if history and self.restore_best and self.best_epoch == int(history[-1]["epoch"]):
            self._snapshot(model)  # the resumed checkpoint is the best epoch

    def __call__(self, epoch: int, model: nn.Module, logs: dict) -> None:
        if self._update(logs) and self.restore_best:
            self._snapshot(model)
        if self.wait >= self.patience:
            logs[STOP_TRAINING] = True
            self.stopped_epoch = epoch + 1
            log.info("early stopping after epoch %d: %s has not improved on %.4g (epoch %s) for %d epochs",
                     epoch + 1, self.monitor, self.best if self.best is not None else float("nan"),
                     self.best_epoch, self.wait)

    def on_fit_end(self, model: nn.Module) -> None:
        """``fit``'s end hook: :meth:`restore` when ``restore_best``."""
        if self.restore_best and not self.restore(model) and self.best_epoch is not None:
            log.warning("EarlyStopping: the best epoch (%d) came before the resumed checkpoint and its weights "
                        "were not saved; keeping the last epoch's weights", self.best_epoch)

    def restore(self, model: nn.Module) -> bool:
        """Load the best epoch's weights into ``model``; returns ``False`` when none are held."""
        if self._best_state is None:
            return False
        model.load_state_dict(self._best_state)
        return True


# ---------------------------------------------------------------------------------------- gradual unfreezing


class GradualUnfreezing:
    """ULMFiT's gradual unfreezing: train the classifier first, then one more layer group at a time.

    Reference: Howard & Ruder, "Universal Language Model Fine-tuning for Text Classification", ACL 2018.

    A callback for :func:`~medtl.train.fit`. Prepare the model with
    ``optimizer_groups(model, lr, freeze="all", include_frozen=True)``: every group is then in the
    optimizer (with its layer-wise rate), and frozen parameters simply get no gradient, which torch
    optimizers skip. After each epoch the callback unfreezes (:func:`~medtl.finetune.unfreeze_groups`) the
    groups due for the next epoch: their parameters get ``requires_grad=True`` and their BatchNorm layers
    become trainable BatchNorm again (statistics update from then on). It never freezes anything. On a
    resumed run ``on_fit_start`` unfreezes what the resumed epoch needs, so resumption stays exact.

    Args:
        schedule: an int ``k`` >= 1: the *n*-th group from the top trains from epoch ``(n-1)·k`` (0-based),
            i.e. one more group every ``k`` epochs; or a strictly increasing sequence of epochs
            ``[e1, e2, ...]``: the 2nd group from the top trains from epoch ``e1``, the 3rd from ``e2``, ...

    Logs:
        ``trainable_groups``: how many groups, counted from the classifier, trained during the epoch.

    Examples:
        >>> groups, _ = optimizer_groups(model, 1e-3, freeze="all", layer_decay=0.8, include_frozen=True)
        >>> fit(model, Supervised(), loader, cfg, param_groups=groups, callbacks=[GradualUnfreezing(1)])
    """

    def __init__(self, schedule: int | Sequence[int] = 1) -> None:
        if isinstance(schedule, int):
            if schedule < 1:
                raise ValueError(f"schedule as an int is the epochs between unfreezings, >= 1; got {schedule}")
        else:
            epochs = list(schedule)
            if not epochs or any(not isinstance(e, int) or e < 1 for e in epochs) or epochs != sorted(set(epochs)):
                raise ValueError("schedule as a sequence lists the (0-based) epochs at which the next group unfreezes, "
                                 f"strictly increasing and >= 1, e.g. [1, 2, 4]; got {schedule!r}")
            schedule = tuple(epochs)
        self.schedule = schedule

    def trainable_groups(self, epoch: int) -> int:
        """How many groups, counted from the classifier, train during ``epoch`` (0-based); at least 1."""
        if isinstance(self.schedule, int):
            return 1 + epoch // self.schedule
        return 1 + sum(e <= epoch for e in self.schedule)

    def _apply(self, model: nn.Module, epoch: int) -> int:
        n = min(self.trainable_groups(epoch), len(model.layer_groups()))
        unfreeze_groups(model, n)
        return n

    def on_fit_start(self, model: nn.Module, history: list[dict]) -> None:
        """Check the model starts frozen as the schedule says, and unfreeze what the first epoch to train needs."""
        groups = model.layer_groups()
        params = dict(model.named_parameters())
        due = min(self.trainable_groups(len(history)), len(groups))
        early = [name for group in groups[:len(groups) - due] for name in group if params[name].requires_grad]
        if early and not history:
            raise ValueError(f"GradualUnfreezing starts from a frozen model, but {len(early)} parameters below the "
                             f"classifier train already (e.g. {early[0]}); prepare it with "
                             "optimizer_groups(model, lr, freeze='all', include_frozen=True)")
        self._apply(model, len(history))

    def __call__(self, epoch: int, model: nn.Module, logs: dict) -> None:
        logs["trainable_groups"] = min(self.trainable_groups(epoch), len(model.layer_groups()))
        self._apply(model, epoch + 1)


# ---------------------------------------------------------------------------------------------------- LP-FT


class LPFTResult(NamedTuple):
    """The two :class:`~medtl.train.FitResult` of :func:`lp_ft`."""

    probe: FitResult
    finetune: FitResult


def lp_ft(model: nn.Module, objective: Objective, loader: Iterable, cfg_lp: TrainConfig, cfg_ft: TrainConfig, *,
          layer_decay: float = 1.0, checkpoint_dir: Path | None = None, callbacks: Sequence[EpochCallback] = (),
          fingerprint_extra: dict | None = None) -> LPFTResult:
    """LP-FT: fit a linear probe on the frozen body, then fine-tune everything starting from that head.

    Reference: Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
    Out-of-Distribution", ICLR 2022. A random head's large early gradients distort the pretrained
    features; a probed head does not.

    Phase 1 freezes every group but the classifier (``optimizer_groups(freeze="all")``, BatchNorm
    statistics frozen too) and trains with ``cfg_lp``; phase 2 unfreezes everything
    (:func:`~medtl.finetune.unfreeze_groups`) and trains with ``cfg_ft`` (use a smaller ``lr``, as the paper
    does). Both go through :func:`~medtl.train.fit`, each with its own checkpoint folder, and phase 2's
    fingerprint includes phase 1's, so an interrupted LP-FT resumes where it stopped.

    Args:
        model: anything with ``layer_groups()`` whose last group is the classifier; modified in place.
        objective: e.g. :class:`~medtl.train.Supervised`.
        loader: training batches, used by both phases.
        cfg_lp: settings of the linear probe.
        cfg_ft: settings of the full fine-tuning.
        layer_decay: layer-wise learning-rate decay of phase 2, in (0, 1].
        checkpoint_dir: if given, phases checkpoint to ``checkpoint_dir/"probe"`` and ``checkpoint_dir/"finetune"``.
        callbacks: passed to both phases (e.g. validation; an :class:`EarlyStopping` restarts in each phase).
        fingerprint_extra: as in :func:`~medtl.train.fit`.

    Returns:
        ``LPFTResult(probe, finetune)``; the model ends fine-tuned, in eval mode.

    Examples:
        >>> probe, finetune = lp_ft(model, Supervised(), loader, TrainConfig(epochs=5, lr=1e-2),
        ...                         TrainConfig(epochs=10, lr=1e-4))
    """
    if not callable(getattr(model, "layer_groups", None)):
        raise TypeError(f"lp_ft needs a model with layer_groups() (a medtl Backbone), got {type(model).__name__}")
    extra = dict(fingerprint_extra or {})
    probe_extra = {**extra, "lp_ft": "probe"}
    groups, _ = optimizer_groups(model, cfg_lp.lr, freeze="all")
    probe = fit(model, objective, loader, cfg_lp, param_groups=groups, callbacks=callbacks,
                checkpoint_dir=Path(checkpoint_dir) / "probe" if checkpoint_dir is not None else None,
                fingerprint_extra=probe_extra, description="lp-ft probe")
    unfreeze_groups(model, "all")
    groups, _ = optimizer_groups(model, cfg_ft.lr, freeze=0, layer_decay=layer_decay)
    finetune = fit(model, objective, loader, cfg_ft, param_groups=groups, callbacks=callbacks,
                   checkpoint_dir=Path(checkpoint_dir) / "finetune" if checkpoint_dir is not None else None,
                   fingerprint_extra={**extra, "lp_ft": "finetune", "probe": run_fingerprint(cfg_lp, probe_extra),
                                      "layer_decay": layer_decay},
                   description="lp-ft finetune")
    return LPFTResult(probe, finetune)


# ----------------------------------------------------------------------------------------------------- L2-SP


class L2SP(Objective):
    """L2-SP: the task loss plus ``alpha/2·||w − w0||²`` over pretrained weights and ``beta/2·||w_head||²``.

    Reference: Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional
    Networks", ICML 2018. The starting point ``w0`` replaces the origin of plain weight decay, so set
    ``cfg.weight_decay = 0`` (the paper's head term already decays the new layer).

    ``w0`` is a copy of every non-head parameter of ``model`` taken at construction, stored as buffers (so
    checkpoints carry it); build the objective right after loading the pretrained weights. Parameters are
    looked up by name at every call, so the model given to ``forward`` must have the same parameter names.

    Args:
        task: the objective whose loss is regularised, e.g. :class:`~medtl.train.Supervised`.
        model: the pretrained model (read once; not kept).
        alpha: weight of the pull towards ``w0``, >= 0 (the paper uses 0.1 – 0.01).
        beta: weight of plain L2 on the head, >= 0 (the paper uses 0.01).
        head: names of the head's parameters; default the last of ``model.layer_groups()`` (the classifier).

    Returns (from ``forward``):
        ``(loss, logs)``: ``loss`` = task loss + penalty (scalar); ``logs`` are the task's, with ``loss`` the
        total, ``task_loss`` and ``l2sp`` (the penalty).

    Examples:
        >>> objective = L2SP(Supervised(), model, alpha=0.01, beta=0.01)
        >>> fit(model, objective, loader, cfg.model_copy(update={"weight_decay": 0.0}))
    """

    def __init__(self, task: Objective, model: nn.Module, alpha: float = 0.01, beta: float = 0.01,
                 head: Sequence[str] | None = None) -> None:
        super().__init__()
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        params = dict(model.named_parameters())
        if head is None:
            if not callable(getattr(model, "layer_groups", None)):
                raise ValueError(f"{type(model).__name__} has no layer_groups(); pass head=[names of the head's "
                                 "parameters]")
            head = model.layer_groups()[-1]
        unknown = [name for name in head if name not in params]
        if unknown:
            raise ValueError(f"head names {unknown} are not parameters of the model; names look like "
                             f"{list(params)[:3]}")
        self.task = task
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.head_names = list(head)
        self.pretrained_names = [name for name in params if name not in set(head)]
        for name in self.pretrained_names:
            self.register_buffer(self._buffer(name), params[name].detach().clone())

    @staticmethod
    def _buffer(name: str) -> str:
        return "w0__" + name.replace(".", "__")

    def penalty(self, model: nn.Module) -> Tensor:
        """``alpha/2·Σ||w − w0||² + beta/2·Σ||w_head||²`` as a float32 scalar tensor."""
        params = dict(model.named_parameters())
        missing = [n for n in self.pretrained_names + self.head_names if n not in params]
        if missing:
            raise KeyError(f"L2SP was built for parameters the model no longer has ({missing[:3]} ...); build it "
                           "again after changing the model (e.g. after add_lora)")
        zero = next(iter(params.values())).new_zeros((), dtype=torch.float32)
        sp = sum((((params[n].float() - self.get_buffer(self._buffer(n)).float()) ** 2).sum()
                  for n in self.pretrained_names), zero)
        head = sum(((params[n].float() ** 2).sum() for n in self.head_names), zero)
        return self.alpha / 2 * sp + self.beta / 2 * head

    def forward(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        task_loss, logs = self.task(model, batch)
        penalty = self.penalty(model)
        loss = task_loss.float() + penalty
        return loss, {**logs, "loss": loss.item(), "task_loss": task_loss.item(), "l2sp": penalty.item()}


# --------------------------------------------------------------------------------------------- BatchNorm policy

BatchNormPolicy = Literal["train", "frozen", "adabn"]


def apply_batchnorm_policy(model: nn.Module, policy: BatchNormPolicy, batches: Iterable[Tensor] | None = None, *,
                           forward: Callable[[Tensor], Tensor] | None = None) -> int:
    """Decide what BatchNorm layers do during fine-tuning: learn statistics, keep them, or re-estimate them.

    * ``"train"``: ordinary BatchNorm (running statistics follow the training batches). Layers frozen by
      an earlier ``"frozen"`` / ``"adabn"`` become BatchNorm again; layers of frozen layer groups (their
      parameters have ``requires_grad=False``) stay frozen.
    * ``"frozen"``: every BatchNorm becomes a :class:`~medtl.finetune.FrozenBatchNorm` with
      ``keep_parameters=True``: running statistics are fixed, in train and eval mode, while the affine
      ``weight`` / ``bias`` stay parameters and train if their ``requires_grad`` is set (the common choice,
      e.g. detectron2's and timm's fine-tuning recipes freeze statistics but not always affine; freeze
      those with ``requires_grad_(False)`` or :func:`~medtl.finetune.optimizer_groups`).
    * ``"adabn"``: AdaBN — every BatchNorm's statistics are re-estimated on ``batches``
      (:func:`medtl.adapt.functional.recompute_batchnorm_statistics`, an exact average over them), then
      frozen as in ``"frozen"``. Reference: Li et al., "Revisiting Batch Normalization For Practical Domain
      Adaptation", ICLR-W 2017.

    :func:`~medtl.finetune.unfreeze_groups` (and so :class:`GradualUnfreezing`) makes a group's BatchNorm
    layers train again; apply the policy after it if statistics must stay frozen.

    Args:
        model: modified in place.
        policy: ``"train"``, ``"frozen"`` or ``"adabn"``.
        batches: ``"adabn"`` only: input tensors ``(B, C, *S)`` on the model's device (e.g. target images).
        forward: ``"adabn"`` only: applied to each batch instead of ``model``.

    Returns:
        For ``"train"``: the number of (trainable) BatchNorm layers; otherwise the number of
        :class:`FrozenBatchNorm` layers.

    Examples:
        >>> apply_batchnorm_policy(model, "adabn", (b["image"] for b in target_loader))
        >>> fit(model, Supervised(), source_loader, cfg)  # statistics stay the target's
    """
    if policy not in ("train", "frozen", "adabn"):
        raise ValueError(f"policy must be 'train', 'frozen' or 'adabn', got {policy!r}")
    if policy == "adabn" and batches is None:
        raise ValueError("policy 'adabn' re-estimates statistics on batches: pass batches=(images, ...)")
    if policy != "adabn" and (batches is not None or forward is not None):
        raise ValueError(f"batches and forward are only used by policy 'adabn', not {policy!r}")
    if policy == "train":
        params = dict(model.named_parameters())
        _unfreeze_batchnorm(model, lambda own: all(params[name].requires_grad for name in own))
        return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if policy == "adabn":
        _unfreeze_batchnorm(model, lambda own: True)
        if recompute_batchnorm_statistics(model, batches, forward) == 0:
            log.warning("apply_batchnorm_policy('adabn'): %s has no BatchNorm layer", type(model).__name__)
    _swap_batchnorm(model, lambda own: True, keep_parameters=True)
    return sum(isinstance(m, FrozenBatchNorm) for m in model.modules())


# ------------------------------------------------------------------------------------------------------ LoRA


class _LoRA(nn.Module):
    """Shared part of the LoRA wrappers: frozen ``base`` plus ``scaling · B(A(x))``."""

    base: nn.Module
    lora_A: nn.Module
    lora_B: nn.Module

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0 (the update is scaled by alpha / rank), got {alpha}")
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank

    def _init_adapters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as peft / Microsoft's loralib
        nn.init.zeros_(self.lora_B.weight)  # the update starts at zero: the wrapped model is unchanged

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling

    def delta_weight(self) -> Tensor:
        """``scaling · B·A`` shaped like ``base.weight``."""
        b, a = self.lora_B.weight, self.lora_A.weight
        return (b.flatten(1) @ a.flatten(1)).view_as(self.base.weight) * self.scaling

    def merged(self) -> nn.Module:
        """The base layer with the low-rank update added to its weight (its parameters stay frozen)."""
        with torch.no_grad():
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


class LoRALinear(_LoRA):
    """LoRA on a linear layer: ``y = base(x) + (alpha/r)·B(A(x))``, ``base`` frozen, ``B`` starting at zero.

    Reference: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.

    Args:
        base: an ``nn.Linear`` (exactly; subclasses such as attention's ``out_proj`` are used by weight
            elsewhere and are refused); its parameters get ``requires_grad=False``.
        rank: ``r``, >= 1.
        alpha: scaling numerator, > 0; the update is scaled by ``alpha / r``.

    Shapes:
        ``(*, in_features)`` → ``(*, out_features)``. ``lora_A``: ``in → r``, ``lora_B``: ``r → out``, no bias.

    Examples:
        >>> layer = LoRALinear(nn.Linear(64, 10), rank=4, alpha=8)
    """

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 8.0) -> None:
        if type(base) is not nn.Linear:
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        super().__init__(base, rank, alpha)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **kw)
        self._init_adapters()


class LoRAConv(_LoRA):
    """LoRA on a 1D/2D/3D convolution: ``y = base(x) + (alpha/r)·B(A(x))``, ``base`` frozen.

    As LoRA for convolutions in peft / loralib: ``A`` is a convolution with the base's kernel size,
    stride, padding and dilation from ``in_channels`` to ``r`` channels, ``B`` a 1×1 convolution from ``r``
    to ``out_channels``, initialised to zero so the wrapped model starts identical. The update is a
    kernel of rank ``r`` (``B·A`` over the flattened ``in × kernel`` axis), which :meth:`merged` folds in.

    Reference: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.

    Args:
        base: an ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (exactly; subclasses with their own padding
            logic, e.g. timm's ``Conv2dSame``, are refused) with ``groups == 1``: grouped and depthwise
            convolutions are refused (:func:`add_lora` skips them).
        rank: ``r``, >= 1.
        alpha: scaling numerator, > 0; the update is scaled by ``alpha / r``.

    Shapes:
        ``(B, in_channels, *S)`` → ``(B, out_channels, *S')`` as ``base``.

    Examples:
        >>> layer = LoRAConv(nn.Conv2d(16, 32, 3, padding=1), rank=4, alpha=8)
    """

    def __init__(self, base: nn.Conv1d | nn.Conv2d | nn.Conv3d, rank: int = 4, alpha: float = 8.0) -> None:
        if type(base) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            raise TypeError(f"LoRAConv wraps nn.Conv1d/2d/3d, got {type(base).__name__}")
        if base.groups != 1:
            raise ValueError(f"LoRAConv factorises a dense kernel; this convolution has groups={base.groups} "
                             "(grouped or depthwise): leave it out (add_lora skips it)")
        super().__init__(base, rank, alpha)
        conv = type(base)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = conv(base.in_channels, rank, base.kernel_size, stride=base.stride, padding=base.padding,
                           dilation=base.dilation, bias=False, padding_mode=base.padding_mode, **kw)
        self.lora_B = conv(rank, base.out_channels, 1, bias=False, **kw)
        self._init_adapters()


def add_lora(model: nn.Module, rank: int = 4, alpha: float = 8.0, *, target: str | None = None,
             train_head: bool = True) -> list[str]:
    """Freeze ``model`` and wrap its linear and convolution layers in LoRA adapters.

    Every parameter gets ``requires_grad=False``; then each ``nn.Linear`` / ``nn.Conv1d/2d/3d`` whose
    name matches ``target`` becomes a :class:`LoRALinear` / :class:`LoRAConv` (trainable ``lora_A`` /
    ``lora_B``). Grouped and depthwise convolutions (``groups > 1``) are skipped — they are already
    cheap, and a low-rank factorisation of a per-group kernel is a different method. With ``train_head``
    the classifier (the last of ``model.layer_groups()``) is not wrapped and trains fully. BatchNorm
    statistics still follow the batches in train mode; combine with
    ``apply_batchnorm_policy(model, "frozen")`` to fix them.

    Args:
        model: modified in place; names of wrapped layers' parameters become ``<name>.base.weight`` etc.
        rank: LoRA rank ``r``, >= 1.
        alpha: the update is scaled by ``alpha / rank``.
        target: regular expression searched in module names (``re.search``); ``None`` = every eligible layer.
        train_head: keep the classifier fully trainable and unwrapped (needs ``layer_groups()``).

    Returns:
        Names of the wrapped modules, in module order.

    Examples:
        >>> add_lora(model, rank=4, alpha=8, target=r"blocks\\.[56]")
        >>> trainable_parameter_report(model)["percent"]  # adapters + classifier, a few % of the network
    """
    if any(isinstance(m, _LoRA) for m in model.modules()):
        raise ValueError("model already has LoRA adapters; merge_lora(model) first to add new ones")
    head: set[str] = set()
    if train_head:
        if not callable(getattr(model, "layer_groups", None)):
            raise ValueError(f"{type(model).__name__} has no layer_groups() to find the head; pass train_head=False")
        head = set(model.layer_groups()[-1])
    pattern = re.compile(target) if target is not None else None
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped, skipped = [], []
    for name, module in list(model.named_modules()):
        kind = type(module)
        if kind not in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
            continue
        if pattern is not None and not pattern.search(name):
            continue
        if any(n in head for n in _own_names(name, module)):
            continue
        if kind is not nn.Linear and module.groups != 1:
            skipped.append(name)
            continue
        adapter = LoRALinear(module, rank, alpha) if kind is nn.Linear else LoRAConv(module, rank, alpha)
        _replace(model, name, adapter)
        wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no nn.Linear / nn.Conv layer matched target={target!r} (outside the head); module names "
                         f"look like {[n for n, _ in model.named_modules()][1:4]}")
    for name, p in model.named_parameters():
        if name in head:
            p.requires_grad_(True)
    if skipped:
        log.info("add_lora: %d grouped/depthwise convolutions left frozen (e.g. %s)", len(skipped), skipped[0])
    return wrapped


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base layer and put the base layer back in the wrapper's place.

    The merged model computes the same function (up to float rounding), has the original parameter
    names and no adapter parameters; merged layers' parameters stay frozen (``requires_grad=False``).

    Args:
        model: modified in place.

    Returns:
        The number of layers merged.

    Examples:
        >>> merge_lora(model); torch.save(model.state_dict(), "merged.pt")  # loads into the plain network
    """
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, _LoRA):
            _replace(model, name, module.merged())
            merged += 1
    return merged


def trainable_parameter_report(model: nn.Module) -> dict[str, int | float]:
    """Count trainable and total parameter elements (each shared parameter once).

    Returns:
        ``{"trainable": int, "total": int, "percent": float}``, ``percent`` = 100·trainable/total (0 when empty).

    Examples:
        >>> report = trainable_parameter_report(model)
        >>> print(f"{report['trainable']:,} of {report['total']:,} parameters train ({report['percent']:.2f} %)")
    """
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total if total else 0.0}


# --------------------------------------------------------------------------------------------- negative transfer


def negative_transfer(transfer_val_auc: float, scratch_val_auc: float, margin: float = 0.0, *,
                      transfer_name: str = "ImageNet initialisation", scratch_name: str = "scratch") -> dict:
    """Is the transferred initialisation worse than training from scratch on validation (negative transfer)?

    Reference: Wang et al., "Characterizing and Avoiding Negative Transfer", CVPR 2019 — transfer is
    negative when the target-only (scratch) model beats the transferred one.

    Args:
        transfer_val_auc: validation AUC of the model fine-tuned from the transferred weights, in [0, 1].
        scratch_val_auc: validation AUC of the same model trained from random initialisation, in [0, 1].
        margin: how far below scratch transfer must fall to count as negative, >= 0 (e.g. the AUC's noise).
        transfer_name: how the report names the transferred initialisation.
        scratch_name: how the report names the scratch baseline.

    Returns:
        ``{"negative": bool, "delta": float, "message": str}``; ``delta`` = transfer − scratch;
        ``negative`` is ``delta < -margin``.

    Examples:
        >>> negative_transfer(0.81, 0.84)["message"]
        'ImageNet initialisation is 0.030 AUC below scratch on validation: negative transfer'
    """
    aucs = []
    for label, value in (("transfer_val_auc", transfer_val_auc), ("scratch_val_auc", scratch_val_auc)):
        try:
            auc = float(value)
        except (TypeError, ValueError):
            auc = float("nan")
        if isinstance(value, bool) or not (math.isfinite(auc) and 0.0 <= auc <= 1.0):
            raise ValueError(f"{label} must be an AUC in [0, 1], got {value!r}; an undefined AUC (NaN: one class "
                             "only in the validation split) cannot decide negative transfer")
        aucs.append(auc)
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    delta = aucs[0] - aucs[1]
    negative = delta < -margin
    if negative:
        message = f"{transfer_name} is {-delta:.3f} AUC below {scratch_name} on validation: negative transfer"
    elif delta < 0:
        message = (f"{transfer_name} is {-delta:.3f} AUC below {scratch_name} on validation, within the "
                   f"{margin:.3f} margin: no negative transfer")
    elif delta == 0:
        message = f"{transfer_name} equals {scratch_name} on validation AUC: no negative transfer"
    else:
        message = f"{transfer_name} is {delta:.3f} AUC above {scratch_name} on validation: no negative transfer"
    return {"negative": negative, "delta": delta, "message": message}
