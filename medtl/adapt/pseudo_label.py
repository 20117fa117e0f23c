"""FixMatch-style pseudo-label self-training on the target hospital as an adaptation plugin."""

from __future__ import annotations

from torch import Tensor

from medtl.adapt.functional import fixmatch_loss
from medtl.train.objectives import AdaptationLoss, DomainFeatures


class PseudoLabelLoss(AdaptationLoss):
    """Confident weak-view predictions on target images become labels for their strong views (FixMatch).

    Reference: Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
    Confidence", NeurIPS 2020. Maths in :func:`medtl.adapt.functional.fixmatch_loss`: pseudo-labels are
    the argmax of the weak view's softmax (no gradient), kept where its top probability is
    ``>= threshold``, and the loss is the cross-entropy of the strong view's logits against them,
    averaged over the whole target batch (0 when no prediction is confident).

    Target batches must hold ``"image"`` (weakly augmented) and ``"image_strong"`` (a strongly augmented
    view of the same images); :class:`~medtl.train.TaskWithAdaptation` forwards both because
    ``uses_strong_view = True``.

    Args:
        threshold: confidence a pseudo-label needs, in [0, 1] (FixMatch's τ, 0.95).

    Attributes:
        last_mask_rate: fraction of target samples that were confident in the last call (``nan`` before
            the first); also reported as ``mask_rate`` in the objective's logs and ``fit``'s history.

    Examples:
        >>> objective = TaskWithAdaptation(PseudoLabelLoss(threshold=0.95), reg=1.0)
    """

    uses_strong_view = True

    def __init__(self, threshold: float = 0.95) -> None:
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a softmax probability and must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.last_mask_rate = float("nan")

    def forward(self, source: DomainFeatures, target: DomainFeatures) -> Tensor:
        if target.strong_logits is None:
            raise ValueError("PseudoLabelLoss needs target.strong_logits (logits of a strongly augmented view); "
                             "call it through TaskWithAdaptation with batch['target']['image_strong']")
        loss, mask = fixmatch_loss(target.logits, target.strong_logits, self.threshold)
        self.last_mask_rate = mask.float().mean().item()
        return loss

    def extra_logs(self) -> dict[str, float]:
        return {"mask_rate": self.last_mask_rate}
