"""The only training loop. Pretraining, fine-tuning and adaptation all call :func:`fit`.

``fit`` does the engineering — device choice, bf16 autocast on GPU, channels_last for 2-D nets, gradient
clipping, warm-up + cosine schedule, an optional moving average of the weights, seeding and deterministic
mode, a progress bar, resumable safetensors checkpoints — and nothing else: the objective decides what the
loss is.

Resumption is exact: every epoch starts by seeding the global RNGs with ``seed + epoch`` and
re-seeding the dataset's random transforms, so epoch *e* sees the same shuffling and augmentation
whether or not the run was interrupted before it.

Stopping early: a callback sets ``logs["stop_training"] = True`` (see :data:`STOP_TRAINING`, and
:class:`medtl.finetune.EarlyStopping`); ``fit`` ends after that epoch, writes a checkpoint, and a later
call with the same checkpoint resumes to "finished" instead of training on.

Several processes: under ``torchrun`` with ``torch.distributed`` initialised, the same ``fit`` trains with
DistributedDataParallel; see :mod:`medtl.train.distributed`. A single process runs exactly as without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn
from tqdm.auto import tqdm

from medtl.config import TrainConfig
from medtl.train.checkpoint import load_checkpoint, read_header, remove_stale_temporaries, save_checkpoint
from medtl.train.objectives import Objective

log = logging.getLogger("medtl.train")

EpochCallback = Callable[[int, nn.Module, dict], None]
CHECKPOINT_NAME = "last.safetensors"
STOP_TRAINING = "stop_training"
"""The ``logs`` key a callback sets to ``True`` to end training after the current epoch."""


@dataclass
class FitResult:
    """What :func:`fit` did. ``history`` has one dict of mean logs per epoch.

    ``stopped_epoch`` is the (1-based) epoch after which a callback stopped training, ``None`` when the
    run went through all ``cfg.epochs``.
    """

    history: list[dict] = field(default_factory=list)
    device: str = "cpu"
    resumed_from_epoch: int | None = None
    seconds: float = 0.0
    stopped_epoch: int | None = None


def select_device(preference: str = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; an explicit choice that is unavailable is an error."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA GPU is visible; set device: auto or cpu")
    if preference == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("train.device is 'mps' but MPS is unavailable; set device: auto or cpu")
    return torch.device(preference)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; in deterministic mode also ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        # warn_only: a few ops (e.g. some index_add) have no deterministic kernel; we want a warning, not a crash.
        torch.use_deterministic_algorithms(True, warn_only=True)


def use_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Lay ``model`` (already on ``device``) out channels_last where that is faster; return whether it did, so the
    caller lays its batches out the same way (:func:`to_device`).

    Yes for 2-D nets on CUDA and on the CPU, whose oneDNN convolutions are faster in that layout (EfficientNet-Lite0
    at 64 px on 2 cores: 1.63x faster fine-tuning steps, 1.49x faster inference; benchmarks/channels_last_cpu.py);
    no for 3-D nets, whose 5-D weights have no channels_last layout (converting them raises), and on MPS.
    """
    preferred = device.type in ("cuda", "cpu") and not any(p.ndim == 5 for p in model.parameters())
    if preferred:
        model.to(memory_format=torch.channels_last)
    return preferred


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move every tensor of a (nested) batch to ``device``; 4-D float images optionally channels_last."""
    if torch.is_tensor(batch):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.ndim == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


def trainable_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def build_optimizer(param_groups: Sequence[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over parameter groups; a group may carry its own ``lr`` (layer-wise rates)."""
    groups = [dict(g) for g in param_groups if len(g["params"]) > 0]
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen (check freeze_groups)")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def run_fingerprint(cfg: TrainConfig, extra: dict | None = None) -> str:
    """Identifies a run's settings, so a checkpoint from different settings is never resumed."""
    payload = {"train": cfg.model_dump(mode="json", exclude={"progress", "device", "checkpoint_every"}),
               "extra": extra or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _set_epoch(loader: Iterable, epoch: int) -> None:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
        return
    # random transforms live in the dataset, episodes in a batch sampler: each re-seeds from the epoch
    for part in (getattr(loader, "dataset", None), getattr(loader, "batch_sampler", None)):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)


def _swap_in_average(model: nn.Module, average: ModelEmaV3) -> dict[str, torch.Tensor]:
    """Load the averaged weights into ``model`` (callbacks judge and keep those); return the raw ones."""
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(average.module.state_dict())
    return trained


def fit(model: nn.Module, objective: Objective, loader: Iterable, cfg: TrainConfig, *,
        checkpoint_dir: Path | None = None, param_groups: Sequence[dict] | None = None,
        callbacks: Sequence[EpochCallback] = (), fingerprint_extra: dict | None = None,
        description: str = "train") -> FitResult:
    """Train ``model`` (and the objective's own parameters) for ``cfg.epochs`` epochs.

    Args:
        model: any ``nn.Module``; frozen parameters (``requires_grad=False``) stay untouched.
        objective: maps ``(model, batch)`` to ``(loss, logs)``; see :mod:`medtl.train.objectives`.
        loader: an iterable of batches with ``len()``; if it (or its dataset) has ``set_epoch``,
            that is called at the start of every epoch.
        cfg: the shared :class:`~medtl.config.TrainConfig`.
        checkpoint_dir: where ``last.safetensors`` is written every ``cfg.checkpoint_every`` epochs;
            if a checkpoint with the same fingerprint is there, training resumes after its epoch.
        param_groups: optimizer groups (e.g. layer-wise learning rates); default: every trainable
            parameter of model and objective at ``cfg.lr``.
        callbacks: ``callback(epoch, model, logs)`` after each epoch, in order; may add entries to
            ``logs``. Setting ``logs["stop_training"] = True`` ends training after this epoch (early
            stopping): the epoch is recorded, a checkpoint is written whatever ``cfg.checkpoint_every``
            says, ``FitResult.stopped_epoch`` is set, and resuming that checkpoint trains no further. A
            callback object may also have ``on_fit_start(model, history)``, called once before the first
            epoch with the epochs already done (empty unless resumed, after the checkpoint is loaded), and
            ``on_fit_end(model)``, called once after the last epoch trained (the stopping one, or the
            ``cfg.epochs``-th) *before* the final checkpoint is written, so what it does to the model
            (e.g. restoring the best weights) is what a resumed run gets back too. Callbacks may unfreeze
            parameters between epochs; the optimizer must already hold them (see
            :func:`medtl.finetune.optimizer_groups` ``include_frozen``). With ``cfg.ema_decay`` set, callbacks
            see the moving average of the weights (so a best-checkpoint callback keeps averaged weights); what
            they write into the weights is dropped when training goes on from the raw weights, except after
            the last epoch.
        fingerprint_extra: anything else that must match for a checkpoint to be resumed.
        description: label of the progress bar.

    Under ``torch.distributed`` with several processes (see :mod:`medtl.train.distributed`): each rank trains on
    ``cuda:LOCAL_RANK`` (or the CPU) with its share of every batch of ``loader``, the model and objective run
    inside DistributedDataParallel, callbacks see logs averaged over the ranks, a stop on any rank stops all,
    and only rank 0 writes the checkpoint (the others wait for it).

    Returns:
        :class:`FitResult`; the model is left on the training device, in eval mode, holding the moving average
        of the weights when ``cfg.ema_decay`` is set (or what ``on_fit_end`` callbacks put there).

    Raises:
        ValueError: an empty loader, or nothing to train.
        CheckpointError: ``checkpoint_dir`` holds a file that is not a medtl safetensors checkpoint (a pickle,
            say); it is neither loaded nor overwritten.
        RuntimeError: a torchrun environment without an initialised process group.
        FloatingPointError: the loss stopped being finite.
    """
    # imported here, not at the top: `python -m medtl.train.distributed` must not find itself imported already
    from medtl.train.distributed import DistributedStep, current_context, shard_loader

    if len(loader) == 0:  # type: ignore[arg-type]
        raise ValueError(f"{description}: the training loader is empty; check the manifest and the split settings")
    ctx = current_context()  # None: one process, the unchanged single-process path
    device = select_device(cfg.device)
    if ctx is not None:
        device = ctx.device(cfg.device, device)
        loader = shard_loader(loader, ctx)
    seed_everything(cfg.seed, cfg.deterministic)
    use_bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")
    if cfg.precision == "bf16" and device.type != "cuda":
        log.warning("precision bf16 requested on %s; running fp32 (bf16 autocast is used on CUDA only)", device)
    model.to(device)
    objective.to(device)
    channels_last = use_channels_last(model, device)
    # Polyak-style averaging (timm's ModelEmaV3) with its warm-up, so the first steps' average is not the start
    # weights: fine-tuning runs here are hundreds of steps, not the millions the plain decay is meant for
    average = (ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True, warmup_power=3 / 4)
               if cfg.ema_decay is not None else None)

    groups = list(param_groups) if param_groups is not None else [{"params": trainable_parameters(model, objective)}]
    if param_groups is not None:
        grouped = {id(p) for g in groups for p in g["params"]}
        extra = [p for p in trainable_parameters(objective) if id(p) not in grouped]
        if extra:
            groups.append({"params": extra})
    optimizer = build_optimizer(groups, cfg)
    steps_per_epoch = len(loader)  # type: ignore[arg-type]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch))
    fingerprint = run_fingerprint(cfg, fingerprint_extra)

    result = FitResult(device=str(device))
    start_epoch = 0
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if ckpt_path is not None and (ctx is None or ctx.is_main):
        for stale in remove_stale_temporaries(ckpt_path):  # left by a run killed while writing its checkpoint
            log.info("%s: removed %s, the unfinished write of a killed run", description, stale)
    if ckpt_path is not None and ckpt_path.exists():
        header = read_header(ckpt_path)  # refuses a file that is not a medtl checkpoint: never overwritten silently
        if header["fingerprint"] == fingerprint:
            load_checkpoint(ckpt_path, model=model, objective=objective, optimizer=optimizer, scheduler=scheduler,
                            header=header, average=average)
            start_epoch = header["epoch"] + 1
            result.history = header["history"]
            result.resumed_from_epoch = header["epoch"]
            log.info("%s: resuming after epoch %d from %s", description, header["epoch"] + 1, ckpt_path)
            if result.history and result.history[-1].get(STOP_TRAINING):
                result.stopped_epoch = int(result.history[-1]["epoch"])
                start_epoch = cfg.epochs  # a callback ended this run: nothing is left to train
                log.info("%s: that run was stopped after epoch %d; not training further", description,
                         result.stopped_epoch)
        else:
            log.warning("%s: %s was written with other settings; training from the start and replacing it",
                        description, ckpt_path)
    step = None
    if ctx is not None:
        ctx.agree(start_epoch, "the epoch to resume from", device)
        step = DistributedStep(model, objective, device)

    for callback in callbacks:
        if callable(getattr(callback, "on_fit_start", None)):
            callback.on_fit_start(model, list(result.history))

    t0 = time.perf_counter()
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    warned = False
    for epoch in range(start_epoch, cfg.epochs):
        params_to_clip = trainable_parameters(model, objective)  # per epoch: callbacks may unfreeze layers
        if not warned and any(id(p) not in optimised for p in params_to_clip):
            warned = True
            log.warning("%s: some trainable parameters are not in the optimizer and will not be updated; to "
                        "unfreeze layers during training, build param_groups with optimizer_groups(..., "
                        "include_frozen=True)", description)
        seed_everything(cfg.seed + epoch, cfg.deterministic)
        _set_epoch(loader, epoch)
        ddp = step.refresh(params_to_clip) if step is not None else None
        model.train()
        objective.train()
        sums: dict[str, float] = {}
        n_steps = 0
        bar = tqdm(loader, total=steps_per_epoch, desc=f"{description} {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress or (ctx is not None and not ctx.is_main), leave=False, mininterval=2.0)
        for batch in bar:
            batch = to_device(batch, device, channels_last)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
            with autocast:
                loss, logs = ddp(batch) if ddp is not None else objective(model, batch)
            finite = bool(torch.isfinite(loss))
            if ctx is not None:  # every rank raises together, instead of the others waiting for it forever
                finite = not ctx.any(not finite, device)
            if not finite:
                raise FloatingPointError(f"{description}: loss became {loss.item()} at epoch {epoch + 1}; "
                                         "lower train.lr or enable grad_clip_norm")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params_to_clip, cfg.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_steps += 1
            if average is not None:
                average.update(model, step=epoch * steps_per_epoch + n_steps)
            bar.set_postfix(loss=f"{logs.get('loss', loss.item()):.4f}")
        means = {k: v / max(1, n_steps) for k, v in sums.items()}
        if step is not None:
            step.sync_buffers()  # one and the same model on every rank before callbacks see it
        if ctx is not None:
            means = ctx.mean(means, device)
        epoch_logs: dict[str, Any] = {"epoch": epoch + 1, **means, "lr": scheduler.get_last_lr()[0]}
        model.eval()
        trained = _swap_in_average(model, average) if average is not None else None
        for callback in callbacks:
            callback(epoch, model, epoch_logs)
        stop = bool(epoch_logs.pop(STOP_TRAINING, False))
        if ctx is not None:
            stop = ctx.any(stop, device)
        last = stop or epoch + 1 == cfg.epochs
        if stop:
            epoch_logs[STOP_TRAINING] = True
        if last:
            for callback in callbacks:
                if callable(getattr(callback, "on_fit_end", None)):
                    callback.on_fit_end(model)
        if trained is not None and not last:
            model.load_state_dict(trained)  # training goes on from the raw weights, not from their average
        result.history.append(epoch_logs)
        log.info("%s epoch %d/%d %s", description, epoch + 1, cfg.epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in epoch_logs.items() if isinstance(v, float)))
        if ckpt_path is not None and ((epoch + 1) % cfg.checkpoint_every == 0 or last):
            if ctx is None or ctx.is_main:
                save_checkpoint(ckpt_path, model=model, objective=objective, optimizer=optimizer,
                                scheduler=scheduler, epoch=epoch, fingerprint=fingerprint, history=result.history,
                                average=average)
            if ctx is not None:
                ctx.barrier()  # no rank moves on (and may read the checkpoint) before it is complete
        if stop:
            result.stopped_epoch = epoch + 1
            log.info("%s: a callback stopped training after epoch %d of %d", description, epoch + 1, cfg.epochs)
            break
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result
