"""Resumable training checkpoints in safetensors — never pickle.

A checkpoint holds the model's and the objective's state, the optimizer's and the scheduler's
tensors, and a JSON header (epoch, optimizer hyper-parameters, a fingerprint of the run's
configuration). Writes are atomic (temp file + ``os.replace``) so a run killed mid-write leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_SEP = "::"


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (shared storage is cloned: safetensors refuses aliases)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(path: Path, *, model: torch.nn.Module, objective: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int, fingerprint: str,
                    history: list[dict]) -> None:
    """Save everything needed to continue training after ``epoch`` (0-based, completed)."""
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"model{_SEP}{k}": v for k, v in model.state_dict().items()})
    tensors.update({f"objective{_SEP}{k}": v for k, v in objective.state_dict().items()})
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
    """The JSON header of a checkpoint, without loading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if "medtl_checkpoint" not in meta:
        raise ValueError(f"{path} is not a medtl training checkpoint (no 'medtl_checkpoint' header); "
                         "delete it or point checkpoint_dir elsewhere")
    return json.loads(meta["medtl_checkpoint"])


def read_fingerprint(path: Path) -> str | None:
    try:
        return read_header(path)["fingerprint"]
    except Exception:  # an unreadable or foreign file is simply not resumable
        return None


def load_checkpoint(path: Path, *, model: torch.nn.Module, objective: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any) -> dict:
    """Restore the states saved by :func:`save_checkpoint`; returns the JSON header."""
    header = read_header(path)
    tensors = load_file(str(path))
    model.load_state_dict(_strip(tensors, "model"))
    objective.load_state_dict(_strip(tensors, "objective"))
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
