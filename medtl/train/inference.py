"""Batched inference with the same device logic as :func:`medtl.train.fit`."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from medtl.train.core import select_device, to_device, use_channels_last


@torch.no_grad()
def run_inference(model: nn.Module, loader: Iterable, *, device: str = "auto",
                  fn: Callable[[nn.Module, Tensor], Tensor] | None = None, key: str = "image") -> np.ndarray:
    """Apply ``fn(model, batch[key])`` (default: ``model(x)``) to every batch, in eval mode.

    Returns:
        The concatenated outputs as float32 numpy, (N, ...).
    """
    dev = select_device(device)
    model.to(dev).eval()
    channels_last = use_channels_last(model, dev)
    fn = fn or (lambda m, x: m(x))
    use_bf16 = dev.type == "cuda"
    outputs = []
    for batch in loader:
        x = to_device(batch[key], dev, channels_last=channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            outputs.append(fn(model, x).float().cpu())
    return torch.cat(outputs).numpy() if outputs else np.zeros((0,), np.float32)


def embeddings(model: nn.Module, loader: Iterable, device: str = "auto") -> np.ndarray:
    """(N, D) pooled pre-logit features (``model.embed``)."""
    return run_inference(model, loader, device=device, fn=lambda m, x: m.embed(x))


def positive_probability(model: nn.Module, loader: Iterable, device: str = "auto") -> np.ndarray:
    """(N,) softmax probability of class 1 (binary tasks)."""
    return run_inference(model, loader, device=device, fn=lambda m, x: torch.softmax(m(x).float(), 1)[:, 1])


def features_and_probabilities(model: nn.Module, loader: Iterable,
                               device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Pooled features and class probabilities of a classifier in one pass over the data.

    Args:
        model: a backbone with ``embed`` / ``classify`` and a classifier head (``num_classes >= 2``).
        loader: batches with an ``"image"`` key.
        device: as :func:`run_inference`.

    Returns:
        ``(N, D)`` pooled pre-logit features (``model.embed``) and ``(N, C)`` softmax probabilities, float32.
    """
    width = int(model.num_features)
    out = run_inference(model, loader, device=device, fn=_features_and_probabilities)
    if out.size == 0:
        raise ValueError("features_and_probabilities: the loader yielded no images; check the rows it was built from")
    if out.ndim != 2 or out.shape[1] <= width:
        raise ValueError(f"features_and_probabilities needs a model with a classifier head; got outputs of shape "
                         f"{out.shape} for {width} features (a backbone created with num_classes=0 has no head)")
    return out[:, :width], out[:, width:]


def embed_with_source_head(backbone: nn.Module, loader: Iterable) -> tuple[np.ndarray, np.ndarray | None]:
    """Pooled features ``(N, D)`` and, for a backbone that kept its source classifier (e.g. ImageNet's 1000
    classes), its softmax over those classes ``(N, Z)`` for LEEP and NCE; one pass over the data."""
    if backbone.num_classes == 0:
        return embeddings(backbone, loader), None
    out = run_inference(backbone, loader, fn=_features_and_probabilities)
    return out[:, :backbone.num_features], out[:, backbone.num_features:]


def _features_and_probabilities(model: nn.Module, x: Tensor) -> torch.Tensor:
    embedding = model.embed(x)
    return torch.cat([embedding.float(), torch.softmax(model.classify(embedding).float(), 1)], 1)
