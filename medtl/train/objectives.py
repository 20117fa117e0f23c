"""Objectives: what turns a batch into a loss. The training loop knows nothing else.

An objective is an ``nn.Module`` (it may own trainable parts such as a projection head or a
domain discriminator, which :func:`medtl.train.fit` optimises with the model) called as
``objective(model, batch) -> (loss, logs)``.

Adaptation follows skada's plugin pattern: ``total = task loss + reg × adaptation loss``, where the
adaptation loss is a module from :mod:`medtl.adapt` that sees source and target features.
Source-only training is the same objective with the zero plugin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Objective(nn.Module):
    """Base class: ``forward(model, batch) -> (loss, logs)`` with ``logs`` of python floats."""

    def forward(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:  # pragma: no cover
        raise NotImplementedError


class Supervised(Objective):
    """Cross-entropy on ``batch["image"]`` / ``batch["label"]`` (labels ``-1`` are ignored).

    Args:
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["label"], ignore_index=-1, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        return loss, {"loss": loss.item(), "acc": acc.item()}


@dataclass
class DomainFeatures:
    """What an adaptation loss may look at for one domain's batch.

    Attributes:
        embedding: (B, D) pooled backbone features (pre-logits).
        logits: (B, num_classes) classifier outputs.
    """

    embedding: Tensor
    logits: Tensor


class AdaptationLoss(nn.Module):
    """Base class of adaptation plugins: ``forward(source, target) -> scalar loss``.

    ``uses_target = False`` tells the objective not to pass target images through the model at all,
    so that the zero plugin is exactly source-only training (target images in a training-mode
    forward pass would leak into BatchNorm statistics).
    """

    uses_target: bool = True

    def forward(self, source: DomainFeatures, target: DomainFeatures) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class NoAdaptation(AdaptationLoss):
    """The zero plugin: training with it is the source-only baseline."""

    uses_target = False

    def forward(self, source: DomainFeatures, target: DomainFeatures) -> Tensor:
        return source.embedding.new_zeros(())


class TaskWithAdaptation(Objective):
    """``loss = cross-entropy(source) + reg × adaptation(source, target)`` on ``{"source", "target"}`` batches.

    Source and target images go through the backbone in one forward pass (one set of BatchNorm
    batch statistics over both domains, as in DANN / Deep CORAL implementations). The model must
    provide ``embed(x) -> (B, D)`` and ``classify(embedding) -> (B, num_classes)``.

    Args:
        adaptation: an :class:`AdaptationLoss` plugin (e.g. :class:`medtl.adapt.CoralLoss`).
        reg: weight of the adaptation loss; ``reg=0`` or :class:`NoAdaptation` is source-only.
    """

    def __init__(self, adaptation: AdaptationLoss, reg: float = 1.0) -> None:
        super().__init__()
        if reg < 0:
            raise ValueError(f"reg must be >= 0, got {reg}")
        self.adaptation = adaptation
        self.reg = reg

    def forward(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        xs, ys = batch["source"]["image"], batch["source"]["label"]
        n = xs.shape[0]
        x = torch.cat([xs, batch["target"]["image"]]) if self.adaptation.uses_target else xs
        embedding = model.embed(x)
        logits = model.classify(embedding)
        source = DomainFeatures(embedding[:n], logits[:n])
        target = DomainFeatures(embedding[n:], logits[n:])
        task = F.cross_entropy(source.logits.float(), ys, ignore_index=-1)
        adapt = self.adaptation(source, target)
        loss = task + self.reg * adapt
        return loss, {"loss": loss.item(), "task": task.item(), "adaptation": adapt.item()}
