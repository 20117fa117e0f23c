"""Objectives: what turns a batch into a loss. The training loop knows nothing else.

An objective is an ``nn.Module`` (it may own trainable parts such as a projection head or a
domain discriminator, which :func:`medtl.train.fit` optimises with the model) called as
``objective(model, batch) -> (loss, logs)``.

Adaptation follows skada's plugin pattern: ``total = task loss + reg × adaptation loss``, where the
adaptation loss is a module from :mod:`medtl.adapt` that sees source and target features.
Source-only training is the same objective with the zero plugin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
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
        class_weights: (num_classes,) positive weight of each class in the loss, e.g. from
            :func:`balanced_class_weights`; ``None`` weighs every image alike. Weighting classes by the inverse
            of their frequency trains the classifier as if the classes were balanced, so that its 0.5 operating
            point does not carry the training set's prevalence to a site whose prevalence differs.

    Examples:
        >>> objective = Supervised(class_weights=balanced_class_weights([0, 1, 1, 1], num_classes=2))
        >>> objective.class_weights
        tensor([2.0000, 0.6667])
    """

    def __init__(self, label_smoothing: float = 0.0, class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        weights = None
        if class_weights is not None:
            weights = torch.as_tensor(list(class_weights), dtype=torch.float32)
            if weights.ndim != 1 or len(weights) < 2 or not bool(torch.isfinite(weights).all() and (weights > 0).all()):
                raise ValueError(f"class_weights must be one finite positive weight per class (at least 2), got "
                                 f"{list(class_weights)}; use balanced_class_weights(labels, num_classes) or None")
        # a buffer, so the weights follow the objective to the model's device
        self.register_buffer("class_weights", weights, persistent=False)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The task loss of (B, num_classes) ``logits`` against (B,) ``labels``, for objectives that compute the
        logits themselves (:class:`TaskWithAdaptation`)."""
        if self.class_weights is not None and logits.shape[1] != len(self.class_weights):
            raise ValueError(f"class_weights has {len(self.class_weights)} entries but the model has "
                             f"{logits.shape[1]} classes; give one weight per class")
        return F.cross_entropy(logits.float(), labels, weight=self.class_weights, ignore_index=-1,
                               label_smoothing=self.label_smoothing)

    def forward(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch["image"])
        loss = self.loss(logits, batch["label"])
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        return loss, {"loss": loss.item(), "acc": acc.item()}


def balanced_class_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> list[float]:
    """Weights ``n / (num_classes × n_c)`` per class c: scikit-learn's ``class_weight="balanced"``.

    Args:
        labels: (N,) class indices of the training images; ``-1`` (unknown) is left out.
        num_classes: how many classes the model predicts.

    Returns:
        ``num_classes`` weights; with them every class contributes the same total weight to the loss.

    Raises:
        ValueError: a class has no labeled image (it cannot be balanced), or a label is out of range.
    """
    from sklearn.utils.class_weight import compute_class_weight

    y = np.asarray(labels).astype(int).ravel()
    y = y[y != -1]
    classes = np.arange(num_classes)
    bad = sorted(set(np.unique(y).tolist()) - set(classes.tolist()))
    if bad:
        raise ValueError(f"labels {bad} are outside 0..{num_classes - 1}; check num_classes")
    missing = sorted(set(classes.tolist()) - set(np.unique(y).tolist()))
    if missing:
        raise ValueError(f"classes {missing} have no labeled training image, so they cannot be balanced; label "
                         f"some, or set the class weights by hand")
    return [float(w) for w in compute_class_weight("balanced", classes=classes, y=y)]


@dataclass
class DomainFeatures:
    """What an adaptation loss may look at for one domain's batch.

    Attributes:
        embedding: (B, D) pooled backbone features (pre-logits).
        logits: (B, num_classes) classifier outputs (of the weakly augmented view, when there are two).
        labels: (B,) class indices, ``-1`` = unknown. :class:`TaskWithAdaptation` fills it for the source
            side only; the target side's is always ``None`` (its labels are never shown to a plugin).
        strong_logits: (B, num_classes) classifier outputs on a strongly augmented view of the same
            images; filled for the target side when the plugin sets ``uses_strong_view = True``.
    """

    embedding: Tensor
    logits: Tensor
    labels: Tensor | None = None
    strong_logits: Tensor | None = None


class AdaptationLoss(nn.Module):
    """Base class of adaptation plugins: ``forward(source, target) -> scalar loss``.

    ``uses_target = False`` tells the objective not to pass target images through the model at all,
    so that the zero plugin is exactly source-only training (target images in a training-mode
    forward pass would leak into BatchNorm statistics).

    ``uses_strong_view = True`` asks the objective to also forward ``batch["target"]["image_strong"]``
    (a strongly augmented view of the target images) and to pass its logits as
    ``target.strong_logits`` (FixMatch-style self-training, :class:`medtl.adapt.PseudoLabelLoss`).

    A plugin may report per-step diagnostics by overriding :meth:`extra_logs`; the objective adds them
    to its logs, which :func:`medtl.train.fit` averages per epoch into the history.
    """

    uses_target: bool = True
    uses_strong_view: bool = False

    def forward(self, source: DomainFeatures, target: DomainFeatures) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def extra_logs(self) -> dict[str, float]:
        """Python floats describing the last :meth:`forward` call (default: none)."""
        return {}


class NoAdaptation(AdaptationLoss):
    """The zero plugin: training with it is the source-only baseline."""

    uses_target = False

    def forward(self, source: DomainFeatures, target: DomainFeatures) -> Tensor:
        return source.embedding.new_zeros(())


class TaskWithAdaptation(Objective):
    """``loss = cross-entropy(source) + reg × adaptation(source, target)`` on ``{"source", "target"}`` batches.

    Source and target images go through the backbone in one forward pass (one set of BatchNorm
    batch statistics over both domains, as in DANN / Deep CORAL implementations); a plugin with
    ``uses_strong_view`` adds ``batch["target"]["image_strong"]`` to that same pass (as FixMatch does).
    The model must provide ``embed(x) -> (B, D)`` and ``classify(embedding) -> (B, num_classes)``.
    The plugin sees the source labels (``source.labels``) but never the target's.

    Args:
        adaptation: an :class:`AdaptationLoss` plugin (e.g. :class:`medtl.adapt.CoralLoss`).
        reg: weight of the adaptation loss; ``reg=0`` or :class:`NoAdaptation` is source-only.
        task: the source task loss; ``None`` = plain cross-entropy. Pass the fine-tuning objective (e.g. with
            its class weights) so that adaptation keeps training the task the model was fine-tuned on.
    """

    def __init__(self, adaptation: AdaptationLoss, reg: float = 1.0, task: Supervised | None = None) -> None:
        super().__init__()
        if reg < 0:
            raise ValueError(f"reg must be >= 0, got {reg}")
        self.adaptation = adaptation
        self.reg = reg
        self.task = task if task is not None else Supervised()

    def forward(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        xs, ys = batch["source"]["image"], batch["source"]["label"]
        n = xs.shape[0]
        strong = self.adaptation.uses_strong_view
        parts = [xs]
        if self.adaptation.uses_target or strong:
            parts.append(batch["target"]["image"])
        if strong:
            parts.append(_strong_view(batch["target"], type(self.adaptation).__name__))
        embedding = model.embed(torch.cat(parts) if len(parts) > 1 else xs)
        logits = model.classify(embedding)
        end = n + (parts[1].shape[0] if len(parts) > 1 else 0)
        source = DomainFeatures(embedding[:n], logits[:n], labels=ys)
        target = DomainFeatures(embedding[n:end], logits[n:end], strong_logits=logits[end:] if strong else None)
        task = self.task.loss(source.logits, ys)
        adapt = self.adaptation(source, target)
        loss = task + self.reg * adapt
        logs = {**self.adaptation.extra_logs(), "loss": loss.item(), "task": task.item(), "adaptation": adapt.item()}
        return loss, logs


def _strong_view(target_batch: dict, plugin: str) -> Tensor:
    if "image_strong" not in target_batch:
        raise ValueError(f"{plugin} needs a strongly augmented view of every target image under the key "
                         f"'image_strong' of batch['target'] (found keys {sorted(target_batch)}); have the target "
                         "dataset's transform return both 'image' (weak augmentation, e.g. flip) and "
                         "'image_strong' (strong augmentation of the same image, e.g. RandAugment + cutout)")
    weak, strong = target_batch["image"], target_batch["image_strong"]
    if strong.shape != weak.shape:
        raise ValueError(f"batch['target']['image_strong'] must have the shape of batch['target']['image'] "
                         f"(one strong view per image), got {tuple(strong.shape)} and {tuple(weak.shape)}")
    return strong
