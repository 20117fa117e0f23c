"""Resumable training checkpoints in safetensors — never pickle.

A checkpoint holds the model's and the objective's state, the optimizer's and the scheduler's
tensors, and a JSON header (epoch, optimizer hyper-parameters, a fingerprint of the run's
configuration). Writes are atomic and durable (temp file, ``fsync``, ``os.replace``, ``fsync`` of the
folder) so a run killed mid-write, or a machine that loses power, leaves the previous checkpoint intact.

Loading never unpickles: only safetensors' own parser reads these files (it parses a JSON header and raw
tensor bytes, nothing executable). A file it cannot parse (a ``torch.save`` pickle renamed, say) is refused
with :class:`CheckpointError`, naming what the file is and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from medtl.workspace import atomic_write

_SEP = "::"
# How a file that safetensors cannot parse starts when it is a pickle: the message then says so. (Never used to
# decide whether a file is safetensors: a valid header length may start with these bytes too.)
_PICKLE_PROTOCOL = b"\x80"  # pickle protocol 2 and later (torch.save's legacy format)
_ZIP = b"PK\x03\x04"  # torch.save's default format: a zip archive holding a pickle


class CheckpointError(ValueError):
    """A file where a safetensors checkpoint or weights should be is something else; it is never unpickled."""


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically and durably (shared storage is cloned: safetensors refuses aliases).

    Args:
        tensors: name → tensor (any device; written from the CPU).
        path: the destination; its folder is created.
        metadata: string → string, stored in the safetensors header.
    """
    cpu = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete temporary files that :func:`atomic_save_tensors` left next to ``path`` when killed mid-write.

    Only for a file one process owns (fit's checkpoint): another writer's temporary file would be deleted too.

    Args:
        path: the checkpoint path.

    Returns:
        The deleted files.
    """
    if not path.parent.is_dir():
        return []
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))  # atomic_write's temporary names
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def _refusal(path: Path, error: Exception) -> CheckpointError:
    """The error for a file that safetensors could not parse, naming a pickle as such."""
    with open(path, "rb") as handle:
        head = handle.read(len(_ZIP))
    if head.startswith(_ZIP) or head.startswith(_PICKLE_PROTOCOL):
        kind = "a PyTorch zip archive (torch.save)" if head.startswith(_ZIP) else "a Python pickle"
        return CheckpointError(
            f"{path} is {kind}, not safetensors: refused, because loading a pickle can run arbitrary code and medtl "
            "never unpickles. If it is a training checkpoint, delete or move it (or point checkpoint_dir elsewhere) "
            "and the run trains from the start; if it holds weights you trust, convert them once with "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'weights.safetensors')")
    return CheckpointError(f"{path} is not a readable safetensors file ({error}); delete or move it (or point "
                           "checkpoint_dir elsewhere) so that it is written afresh")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        Name → tensor.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is a pickle or otherwise not safetensors; the message names the file and says
            what to do.
    """
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise _refusal(Path(path), exc) from exc


def save_checkpoint(path: Path, *, model: torch.nn.Module, objective: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int, fingerprint: str,
                    history: list[dict], average: torch.nn.Module | None = None) -> None:
    """Save everything needed to continue training after ``epoch`` (0-based, completed); ``average``: the moving
    average of the weights, when the run keeps one."""
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"model{_SEP}{k}": v for k, v in model.state_dict().items()})
    tensors.update({f"objective{_SEP}{k}": v for k, v in objective.state_dict().items()})
    if average is not None:
        tensors.update({f"average{_SEP}{k}": v for k, v in average.state_dict().items()})
    opt_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim{_SEP}{idx}{_SEP}{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    header = {
        "epoch": epoch,
        "fingerprint": fingerprint,
        "param_groups": opt_state["param_groups"],
        "optim_scalars": scalars,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "history": history,
    }
    atomic_save_tensors(tensors, path, {"medtl_checkpoint": json.dumps(header, default=_jsonable)})


def read_header(path: Path) -> dict:
    """The JSON header of a checkpoint, without loading its tensors.

    Raises:
        CheckpointError: the file is a pickle, not safetensors, or a safetensors file without medtl's header.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except SafetensorError as exc:
        raise _refusal(Path(path), exc) from exc
    if "medtl_checkpoint" not in meta:
        raise CheckpointError(f"{path} is not a medtl training checkpoint (no 'medtl_checkpoint' header); "
                              "delete or move it, or point checkpoint_dir elsewhere")
    return json.loads(meta["medtl_checkpoint"])


def load_checkpoint(path: Path, *, model: torch.nn.Module, objective: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, header: dict | None = None,
                    average: torch.nn.Module | None = None) -> dict:
    """Restore the states saved by :func:`save_checkpoint`; returns the JSON header (``header``: the file's, when
    the caller has already read it with :func:`read_header`)."""
    header = read_header(path) if header is None else header
    tensors = load_tensors(path)
    model.load_state_dict(_strip(tensors, "model"))
    objective.load_state_dict(_strip(tensors, "objective"))
    if average is not None:
        average.load_state_dict(_strip(tensors, "average"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in _strip(tensors, "optim").items():
        idx, name = key.split(_SEP)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in header["optim_scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
    if scheduler is not None and header.get("scheduler") is not None:
        scheduler.load_state_dict(header["scheduler"])
    return header


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    head = prefix + _SEP
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


def _jsonable(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
