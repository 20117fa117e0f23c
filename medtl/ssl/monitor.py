"""Watching self-supervised pretraining: k-NN accuracy of the embeddings on a small labeled set.

The SSL loss says how well the pretext task is solved, not whether the representation separates the
classes that matter; a weighted k-NN classifier on frozen embeddings (Wu et al., CVPR 2018; DINO) does,
cheaply and without training anything.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from medtl.select.scores import knn_accuracy
from medtl.train.core import to_device, use_channels_last


@torch.no_grad()
def embed_loader(model: nn.Module, loader: Iterable[dict], device: torch.device | str | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Embed every batch of a labeled loader with ``model.embed``, in eval mode, in one pass.

    The model's training mode is restored afterwards. Unlike :func:`medtl.train.inference.embeddings`
    it returns the labels read in the same pass (so shuffling or random transforms cannot misalign
    them) and does not move the model.

    Args:
        model: provides ``embed(x) -> (B, D)``.
        loader: batches ``{"image": (B, C, *S), "label": (B,)}``, e.g. from
            :func:`medtl.data.datasets.make_loader` over an :func:`~medtl.data.transforms.eval_transform` dataset.
        device: where the images go; default the device of the model's parameters.

    Returns:
        ``(features, labels)``: float32 ``(N, D)`` and int64 ``(N,)`` numpy arrays.

    Examples:
        >>> features, labels = embed_loader(backbone, val_loader)
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    channels_last = use_channels_last(model, device)
    features, labels = [], []
    try:
        for batch in loader:
            x = to_device(batch["image"], device, channels_last=channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                features.append(model.embed(x).float().cpu())
            labels.append(torch.as_tensor(batch["label"]).long().cpu())
    finally:
        model.train(was_training)
    if not features:
        raise ValueError("the loader yielded no batches; give embed_loader a non-empty labeled loader")
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


class KnnMonitor:
    """Epoch callback for :func:`medtl.train.fit`: weighted k-NN accuracy of ``model.embed`` features.

    At the end of every ``every``-th epoch (and of the last one when ``epochs`` is given) it embeds the
    labeled ``train_loader`` (the neighbours) and ``val_loader`` (the queries) with :func:`embed_loader`
    and writes :func:`medtl.select.scores.knn_accuracy` to ``logs["knn_acc"]``, so it lands in
    ``fit``'s history and log. Samples labeled < 0 (unlabeled) are left out. Use small subsets (a few
    hundred images): this runs on the training device between epochs.

    Args:
        train_loader: labeled batches ``{"image", "label"}`` whose embeddings vote.
        val_loader: labeled batches ``{"image", "label"}`` to classify.
        every: evaluate after epochs ``every``, ``2 * every``, ... (1-based).
        epochs: the run's total epochs, so the last one is always evaluated; None: only multiples of ``every``.
        k: neighbours per vote.
        temperature: softness of the similarity weights.

    Attributes:
        history_: ``(epoch, accuracy)`` per evaluation, epochs 1-based as in ``fit``'s ``logs["epoch"]``.

    Examples:
        >>> monitor = KnnMonitor(train_loader, val_loader, every=5, epochs=cfg.epochs)
        >>> result = fit(backbone, objective, ssl_loader, cfg, callbacks=[monitor])
        >>> [h.get("knn_acc") for h in result.history]
    """

    def __init__(self, train_loader: Iterable[dict], val_loader: Iterable[dict], *, every: int = 1,
                 epochs: int | None = None, k: int = 20, temperature: float = 0.07) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1 (evaluate every `every` epochs), got {every}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 (the run's total, e.g. cfg.epochs) or None, got {epochs}")
        if k < 1 or temperature <= 0:
            raise ValueError(f"k must be >= 1 and temperature > 0 (20 and 0.07 are usual), got k={k}, "
                             f"temperature={temperature}")
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.every = every
        self.epochs = epochs
        self.k = k
        self.temperature = temperature
        self.history_: list[tuple[int, float]] = []

    def __call__(self, epoch: int, model: nn.Module, logs: dict) -> None:
        """Evaluate if epoch ``epoch`` (0-based, as :func:`medtl.train.fit` passes it) is due."""
        done = epoch + 1
        if done % self.every != 0 and done != self.epochs:
            return
        train_x, train_y = _labeled(*embed_loader(model, self.train_loader))
        val_x, val_y = _labeled(*embed_loader(model, self.val_loader))
        accuracy = knn_accuracy(train_x, train_y, val_x, val_y, k=self.k, temperature=self.temperature)
        logs["knn_acc"] = accuracy
        self.history_.append((done, accuracy))


def _labeled(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = labels >= 0
    if not keep.any():
        raise ValueError("KnnMonitor needs labeled images (label >= 0) in both loaders; every label here is < 0")
    return features[keep], labels[keep]
