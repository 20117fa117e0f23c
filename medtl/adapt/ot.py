"""Optimal-transport alignment (DeepJDOT) as an adaptation plugin."""

from __future__ import annotations

from torch import Tensor

from medtl.adapt.functional import ot_alignment_loss
from medtl.train.objectives import AdaptationLoss, DomainFeatures


class OTAlignmentLoss(AdaptationLoss):
    """Transport each batch's target embeddings onto the source ones (Damodaran et al., DeepJDOT, ECCV 2018).

    On every batch the exact OT plan γ between uniform weights on the source and target samples is
    solved (POT's ``ot.emd``) for the cost ``C = ||e_s - e_t||² + label_weight × CE(target logits,
    source label)``; the loss is ``<γ, C>`` with γ held fixed (no gradient through the solver), see
    :func:`medtl.adapt.functional.ot_alignment_loss`. The exact solver is O(B³) on CPU, cheap at
    usual batch sizes (B <= 256).

    Args:
        label_weight: weight of the label term (DeepJDOT's λ_t / α ratio); 0 = feature alignment only.
            With ``label_weight > 0`` the source features must carry labels, which
            :class:`~medtl.train.TaskWithAdaptation` provides.

    Examples:
        >>> objective = TaskWithAdaptation(OTAlignmentLoss(label_weight=1.0), reg=0.01)
    """

    def __init__(self, label_weight: float = 0.0) -> None:
        super().__init__()
        if label_weight < 0:
            raise ValueError(f"label_weight must be >= 0 (0 = align features only), got {label_weight}")
        self.label_weight = float(label_weight)

    def forward(self, source: DomainFeatures, target: DomainFeatures) -> Tensor:
        if self.label_weight > 0 and source.labels is None:
            raise ValueError("OTAlignmentLoss(label_weight > 0) needs source labels: call it through "
                             "TaskWithAdaptation (which sets source.labels), or set label_weight=0")
        return ot_alignment_loss(source.embedding, target.embedding, source.labels, target.logits,
                                 self.label_weight)
