"""Multi-GPU (or multi-process CPU) training with torch DDP, through the one :func:`medtl.train.fit`.

Launch any training stage under ``torchrun``; this module's entry point starts the process group and then
runs the ordinary ``medtl`` command on every rank::

    torchrun --standalone --nproc_per_node=4 -m medtl.train.distributed finetune --config site_a.yaml

When ``torch.distributed`` is initialised with more than one process, ``fit``

* puts each rank on its own device (``cuda:LOCAL_RANK``, or the CPU),
* shards the loader: each batch the single-process loader would yield is split across the ranks
  (:class:`ShardedBatchSampler`), so ``train.batch_size`` stays the *global* batch and N ranks train on the
  same batches, in the same order, as one process would (each rank loads and augments only its share),
* wraps the model *and* the objective in one :class:`~torch.nn.parallel.DistributedDataParallel` module
  (:class:`ObjectiveStep`), so an objective may call ``model.embed`` / ``model.classify`` or anything else and
  its own heads (projection, discriminator) are synchronised too,
* after every epoch copies rank 0's buffers (BatchNorm statistics) to the others, so that every rank holds the
  same model, averages the logged metrics over the ranks, and only then runs the callbacks, and
* writes checkpoints from rank 0 only, while the others wait at a barrier.

Gradients are averaged over ranks, so with a mean-reduced loss and no BatchNorm an N-rank run matches the
one-process run up to floating-point rounding. BatchNorm normalises with each rank's share of the batch
(standard DDP; rank 0's running statistics are broadcast every step), and a contrastive loss (SimCLR) sees
each rank's share as its batch of negatives.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Sampler

log = logging.getLogger("medtl.train")

TRAINING_STAGES = ("pretrain", "finetune", "adapt")
"""The ``medtl`` commands that train (call :func:`medtl.train.fit`); only these make sense under torchrun."""


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in an initialised process group of more than one process.

    Attributes:
        rank: global rank (0 writes checkpoints).
        world_size: number of processes.
        local_rank: rank on this machine; picks the GPU (``LOCAL_RANK`` from torchrun).
    """

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes checkpoints."""
        return self.rank == 0

    def device(self, preference: str, default: torch.device) -> torch.device:
        """The device this rank trains on.

        Args:
            preference: ``train.device`` (``auto``, ``cpu``, ``cuda``, ``mps``).
            default: what :func:`medtl.train.core.select_device` chose for ``preference``.

        Returns:
            ``cuda:<local_rank>`` when ``default`` is CUDA, else ``default``.

        Raises:
            RuntimeError: CUDA training with fewer visible GPUs than local ranks, or MPS (no collectives).
        """
        if default.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"local rank {self.local_rank} has no GPU of its own ({torch.cuda.device_count()} "
                                   "visible); start at most one process per GPU (torchrun --nproc_per_node) or set "
                                   "train.device: cpu")
            return torch.device("cuda", self.local_rank)
        if default.type == "mps":
            raise RuntimeError(f"train.device {preference!r} resolves to MPS, which torch.distributed does not "
                               "support; set train.device: cpu for multi-process CPU training")
        return default

    def mean(self, values: Mapping[str, float], device: torch.device) -> dict[str, float]:
        """The mean of each value over the ranks (every rank must pass the same keys).

        Args:
            values: this rank's numbers, e.g. an epoch's mean loss.
            device: a device the process group can reduce on (the training device).

        Returns:
            The same keys with the cross-rank means, identical on every rank.

        Raises:
            RuntimeError: the ranks logged different keys.
        """
        keys = sorted(values)
        # a hash of the key list, not the list itself: collectives of tensors only (no pickled objects)
        digest = int.from_bytes(hashlib.sha256("\n".join(keys).encode()).digest()[:6], "big")
        try:
            self.agree(digest, "logged metric names", device)
        except RuntimeError as exc:
            raise RuntimeError(f"ranks logged different metrics (this rank: {keys}); an objective must return the "
                               "same log keys on every rank") from exc
        if not keys:
            return {}
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return {k: v / self.world_size for k, v in zip(keys, tensor.tolist())}

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is true on at least one rank (the same answer on every rank)."""
        tensor = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item() > 0)

    def agree(self, value: int, what: str, device: torch.device) -> int:
        """Check that every rank holds the same integer (e.g. the epoch a checkpoint resumes from).

        Raises:
            RuntimeError: naming ``what`` and the range of values seen.
        """
        tensor = torch.tensor([value, -value], dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        high, low = int(tensor[0].item()), -int(tensor[1].item())
        if high != low:
            raise RuntimeError(f"ranks disagree on {what}: values from {low} to {high}; the checkpoint folder must be "
                               "on storage that every rank reads (a shared or the same local disk)")
        return value

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        dist.barrier()


def current_context() -> DistributedContext | None:
    """This process's :class:`DistributedContext`, or ``None`` for single-process training.

    ``None`` also when the process group has one process: that run is exactly the single-process one.

    Raises:
        RuntimeError: torchrun's environment says there are several processes but nobody initialised the process
            group (the stage would otherwise train ``WORLD_SIZE`` independent copies into one checkpoint).
    """
    if not (dist.is_available() and dist.is_initialized()):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set (a torchrun launch?) but torch.distributed is not "
                "initialised, so every process would train on its own; launch the stage as `torchrun ... -m "
                "medtl.train.distributed <stage> --config ...`, or call medtl.train.distributed.init_distributed() "
                "before fit")
        return None
    world_size = dist.get_world_size()
    if world_size == 1:
        return None
    rank = dist.get_rank()
    return DistributedContext(rank=rank, world_size=world_size,
                              local_rank=int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))


def init_distributed(device: str = "auto") -> DistributedContext | None:
    """Start the default process group from torchrun's environment (``env://``); a no-op when already started.

    The backend is gloo for CPU tensors, plus NCCL for CUDA tensors when a GPU is visible (``cpu:gloo,cuda:nccl``),
    so one group serves GPU training and CPU-only stages alike. Each rank's current CUDA device becomes
    ``cuda:LOCAL_RANK``, so code that says ``"cuda"`` (evaluation after training) stays on the rank's own GPU.

    Args:
        device: ``cpu`` forces a gloo-only group even where GPUs are visible; anything else lets CUDA decide.

    Returns:
        The context, or ``None`` without a multi-process environment (``WORLD_SIZE`` unset or 1).

    Raises:
        RuntimeError: ``WORLD_SIZE`` is set without ``RANK``, ``MASTER_ADDR`` or ``MASTER_PORT``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE is set but {', '.join(missing)} are not: launch with torchrun, which "
                               "sets them, or export them for every process")
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo", init_method="env://")
    return current_context()


class ShardedBatchSampler(Sampler[list[int]]):
    """Deals out a batch sampler's batches to the ranks of a process group.

    Two ways, by what a batch is:

    * ``split_batches=True`` (a plain :class:`~torch.utils.data.BatchSampler`): every batch is split, rank *r*
      taking items ``r, r + world_size, ...``. The global batch, the number of steps and the order are the
      single-process ones. Each rank must iterate the base sampler identically, which holds for torch's samplers
      because :func:`medtl.train.fit` seeds every rank's RNG alike each epoch. A batch smaller than the world is
      padded by repeating its items, so no rank gets an empty one.
    * ``split_batches=False`` (episodes, e.g. :class:`medtl.fewshot.EpisodeSampler`, where a batch is one
      indivisible unit): whole batches go round-robin, rank *r* taking batches ``r, r + world_size, ...``; the last
      round is padded with batches from the start, so every rank takes ``ceil(len / world_size)`` steps.

    Args:
        base: the loader's batch sampler.
        rank: this process's rank.
        world_size: number of processes.
        split_batches: as above.
    """

    def __init__(self, base: Iterable[list[int]], rank: int, world_size: int, split_batches: bool) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank}, "
                             f"world_size={world_size}")
        self.base = base
        self.rank = rank
        self.world_size = world_size
        self.split_batches = split_batches

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the base sampler (and its index sampler) where they take one."""
        for part in (self.base, getattr(self.base, "sampler", None)):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.base)  # type: ignore[arg-type]
        return n if self.split_batches else math.ceil(n / self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.split_batches:
            for batch in self.base:
                batch = list(batch)
                if len(batch) < self.world_size:
                    batch = (batch * self.world_size)[:self.world_size]
                yield batch[self.rank::self.world_size]
            return
        batches = [list(b) for b in self.base]
        if not batches:
            return
        total = len(self) * self.world_size
        padded = [batches[i % len(batches)] for i in range(total)]
        yield from padded[self.rank::self.world_size]


def shard_loader(loader: Iterable, ctx: DistributedContext) -> Iterable:
    """The part of ``loader`` that rank ``ctx.rank`` trains on (see :class:`ShardedBatchSampler`).

    Args:
        loader: a :class:`~torch.utils.data.DataLoader` over a map-style dataset, or a
            :class:`medtl.data.datasets.PairedLoader` of two (each side is sharded).
        ctx: the process group.

    Returns:
        A loader of the same kind yielding this rank's share; ``set_epoch`` on its dataset and batch sampler
        reaches the originals.

    Raises:
        ValueError: any other iterable (a list of batches, an iterable-style dataset), which cannot be sharded
            without loading every item on every rank.
    """
    if isinstance(loader, DataLoader):
        if loader.batch_sampler is None:
            raise ValueError("fit cannot shard a DataLoader without a batch sampler (an IterableDataset or "
                             "batch_size=None) across ranks; use a map-style dataset with batch_size")
        split = type(loader.batch_sampler) is BatchSampler
        sampler = ShardedBatchSampler(loader.batch_sampler, ctx.rank, ctx.world_size, split_batches=split)
        options = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                       timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                       multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                       persistent_workers=loader.persistent_workers, pin_memory_device=loader.pin_memory_device,
                       in_order=loader.in_order)
        if loader.num_workers > 0:
            options["prefetch_factor"] = loader.prefetch_factor
        return DataLoader(loader.dataset, batch_sampler=sampler, **options)
    from medtl.data.datasets import PairedLoader  # here: importing MONAI is not free, and only this case needs it

    if isinstance(loader, PairedLoader):
        return PairedLoader(shard_loader(loader.source, ctx), shard_loader(loader.target, ctx))
    raise ValueError(f"fit under torch.distributed shards a torch DataLoader or a PairedLoader, got "
                     f"{type(loader).__name__}; build the training data as a DataLoader over a map-style dataset")


class ObjectiveStep(nn.Module):
    """The model and the objective as one module whose ``forward(batch)`` is ``objective(model, batch)``.

    DDP synchronises gradients only for work done inside its own ``forward``; an objective calls
    ``model.embed``, ``model.classify`` and its own heads, so the whole objective runs inside it.
    """

    def __init__(self, model: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: object) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective(self.model, batch)


class DistributedStep:
    """Keeps a DDP wrapper of :class:`ObjectiveStep` whose parameters are the currently trainable ones.

    DDP fixes the parameters and buffers it synchronises when it is built, and fit's callbacks may unfreeze layers
    (gradual unfreezing) or swap modules (BatchNorm policies) between epochs, so :meth:`refresh` rebuilds the
    wrapper when either set changes.

    Args:
        model: the network being trained.
        objective: the objective, with its own trainable parts.
        device: the rank's training device.
    """

    def __init__(self, model: nn.Module, objective: nn.Module, device: torch.device) -> None:
        self.step = ObjectiveStep(model, objective)
        self.device = device
        self.ddp: DistributedDataParallel | None = None
        self._key: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())

    def refresh(self, trainable: Sequence[nn.Parameter]) -> DistributedDataParallel:
        """The DDP module for this epoch, rebuilt when ``trainable`` or the buffers differ from the last call's."""
        key = (tuple(id(p) for p in trainable), tuple(id(b) for b in self.step.buffers()))
        if self.ddp is None or key != self._key:
            if self.ddp is not None:
                # the old reducer's gradient hooks go with it; collect now so they never fire twice
                self.ddp = None
                gc.collect()
            # find_unused_parameters: an objective may leave trainable parts unused (a classifier during SSL)
            self.ddp = DistributedDataParallel(
                self.step, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
            self._key = key
        return self.ddp


    def sync_buffers(self) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics, a MoCo queue) to every rank.

        DDP broadcasts them at the start of every forward pass, so after an epoch's last step each rank holds the
        statistics of its own share of that batch; callbacks, the checkpoint and the exported model must all see
        one and the same model.
        """
        for buffer in self.step.buffers():
            dist.broadcast(buffer.data, src=0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medtl.train.distributed <stage> [medtl options]``, meant to run under ``torchrun``.

    Starts the process group from torchrun's environment, quiets the logs of ranks other than 0, runs
    ``medtl <stage> ...`` on every rank and closes the group. Without torchrun it runs the stage in one process.

    Args:
        argv: ``[stage, *options]``; the stage is one of :data:`TRAINING_STAGES`, the options those of ``medtl``.

    Returns:
        The ``medtl`` command's exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m medtl.train.distributed",
        description="Run a medtl training stage on every rank of a torchrun launch (DDP through medtl.train.fit).",
        epilog="example: torchrun --standalone --nproc_per_node=2 -m medtl.train.distributed finetune "
               "--config configs/demo.yaml")
    parser.add_argument("stage", choices=TRAINING_STAGES, help="the medtl command to run")
    args, rest = parser.parse_known_args(argv)
    ctx = init_distributed()
    quiet = ctx is not None and not ctx.is_main
    if quiet:
        # medtl.cli's basicConfig is then a no-op: only rank 0 reports progress; the others only warnings
        logging.basicConfig(level=logging.WARNING, format=f"rank {ctx.rank} %(levelname)s %(name)s: %(message)s")
    from medtl import cli

    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull if quiet else sys.stdout):
            return cli.main([args.stage, *rest])  # the summary is printed once, by rank 0 (errors go to stderr)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
