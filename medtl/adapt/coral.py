"""Deep CORAL as an adaptation plugin."""

from __future__ import annotations

from torch import Tensor

from medtl.adapt.functional import coral_loss
from medtl.train.objectives import AdaptationLoss, DomainFeatures


class CoralLoss(AdaptationLoss):
    """Align second-order statistics of source and target embeddings (Sun & Saenko 2016).

    Examples:
        >>> objective = TaskWithAdaptation(CoralLoss(), reg=1.0)
    """

    def forward(self, source: DomainFeatures, target: DomainFeatures) -> Tensor:
        return coral_loss(source.embedding, target.embedding)
