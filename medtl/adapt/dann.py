"""DANN (domain-adversarial training) as an adaptation plugin."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medtl.train.objectives import AdaptationLoss, DomainFeatures


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, alpha: float) -> Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.alpha * grad, None


def gradient_reversal(x: Tensor, alpha: float = 1.0) -> Tensor:
    """Identity forward; multiplies the gradient by ``-alpha`` backward (Ganin & Lempitsky 2015)."""
    return _GradientReversal.apply(x, alpha)


class DANNLoss(AdaptationLoss):
    """A domain discriminator trained through a gradient-reversal layer.

    Reference: Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016.
    The discriminator outputs one logit (source = 1, target = 0), trained with BCE-with-logits.

    Args:
        embedding_dim: D of the backbone's pooled features.
        hidden_dim: width of the discriminator's hidden layer.
        alpha: gradient-reversal strength.
    """

    def __init__(self, embedding_dim: int, hidden_dim: int = 256, alpha: float = 1.0) -> None:
        super().__init__()
        if embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        if hidden_dim <= 0:
            raise ValueError(f"hidden_dim is the discriminator's width and must be positive, got {hidden_dim}")
        if alpha < 0:
            raise ValueError(f"alpha scales the reversed gradient and must be >= 0 (0 = no reversal), got {alpha}")
        self.alpha = alpha
        self.discriminator = nn.Sequential(nn.Linear(embedding_dim, hidden_dim), nn.ReLU(),
                                           nn.Linear(hidden_dim, 1))

    def forward(self, source: DomainFeatures, target: DomainFeatures) -> Tensor:
        features = gradient_reversal(torch.cat([source.embedding, target.embedding]).float(), self.alpha)
        logits = self.discriminator(features).squeeze(1)
        domain = torch.cat([logits.new_ones(source.embedding.shape[0]), logits.new_zeros(target.embedding.shape[0])])
        return F.binary_cross_entropy_with_logits(logits, domain)
