"""Multi-kernel MMD (DAN) as an adaptation plugin."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from medtl.adapt.functional import mk_mmd
from medtl.train.objectives import AdaptationLoss, DomainFeatures


class MMDLoss(AdaptationLoss):
    """Match source and target embedding distributions with multi-kernel MMD (Long et al., DAN, ICML 2015).

    The loss is :func:`medtl.adapt.functional.mk_mmd` between the (B, D) source and target
    embeddings of each batch: the biased estimate of MMD² under an equal-weight sum of Gaussian kernels.

    Args:
        bandwidths: fixed kernel widths σ (each > 0); ``None`` (default) re-estimates them on every
            batch as the median pairwise distance × {2^-2, 2^-1, 1, 2, 2^2}.

    Examples:
        >>> objective = TaskWithAdaptation(MMDLoss(), reg=1.0)
    """

    def __init__(self, bandwidths: Sequence[float] | None = None) -> None:
        super().__init__()
        if bandwidths is not None:
            bandwidths = tuple(float(b) for b in bandwidths)
            if not bandwidths or min(bandwidths) <= 0:
                raise ValueError(f"bandwidths must be a non-empty list of positive kernel widths, or None for the "
                                 f"median heuristic; got {bandwidths}")
        self.bandwidths = bandwidths

    def forward(self, source: DomainFeatures, target: DomainFeatures) -> Tensor:
        return mk_mmd(source.embedding, target.embedding, self.bandwidths)
