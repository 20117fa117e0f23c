"""BYOL as an objective for the one training loop.

Reference: Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020. The heads, the loss, the momentum update and its schedule are lightly's.
"""

from __future__ import annotations

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from torch import Tensor, nn

from medtl.ssl.moco import MomentumEncoder, _check_head_dims, _embedding_dim
from medtl.train.objectives import Objective


class BYOL(Objective):
    """Negative cosine similarity between the online prediction of one view and the target projection
    of the other; no negatives.

    The online network is the model given to :meth:`forward` (the backbone being trained), a projection
    head and a prediction head; the target network is a :class:`~medtl.ssl.moco.MomentumEncoder` copy of
    the backbone and the projection head, made here, whose momentum rises from ``momentum`` to 1 along a
    cosine over ``total_steps`` (as in the paper). The loss is symmetric (each view is predicted once and
    is the target once) and lies in [-1, 1]: -1 when every prediction points along its target.

    The target network and its update count are part of ``state_dict()``, so :func:`medtl.train.fit`
    checkpoints and resumes them. Expects batches with ``view1`` and ``view2``: (B, C, *spatial) tensors
    from :func:`medtl.data.transforms.ssl_views_transform` (2D or 3D). In training mode with gradients
    enabled, each call first moves the target towards the current online weights; otherwise it only
    evaluates the loss.

    Args:
        backbone: the network that will be trained (must provide ``embed(x) -> (B, D)`` and
            ``num_features``); pass the same module to :func:`medtl.train.fit` and to :meth:`forward`.
        projection_dim: output size of the projection and prediction heads (256 in the paper).
        hidden_dim: hidden size of both heads (default: 4096, the paper's).
        momentum: target momentum at the first step (the paper's 0.996 is for 1000-epoch ImageNet runs;
            0.99 suits short ones), see :class:`~medtl.ssl.moco.MomentumEncoder`.
        total_steps: steps of the whole run, for the cosine momentum schedule; None keeps it constant.

    Examples:
        >>> objective = BYOL(backbone, projection_dim=256, total_steps=cfg.epochs * len(loader))
        >>> loss, logs = objective(backbone, {"view1": x1, "view2": x2})
    """

    def __init__(self, backbone: nn.Module, projection_dim: int = 256, hidden_dim: int | None = None,
                 momentum: float = 0.99, total_steps: int | None = None) -> None:
        super().__init__()
        embedding_dim = _embedding_dim(backbone)
        _check_head_dims(projection_dim, hidden_dim)
        hidden_dim = hidden_dim or 4096
        self.projection = BYOLProjectionHead(embedding_dim, hidden_dim, projection_dim)
        self.prediction = BYOLPredictionHead(projection_dim, hidden_dim, projection_dim)
        self.momentum_encoder = MomentumEncoder(backbone, self.projection, momentum, total_steps)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        x1, x2 = batch["view1"], batch["view2"]
        train_step = self.training and torch.is_grad_enabled()
        logs = {"momentum": self.momentum_encoder.update(model, self.projection)} if train_step else {}
        predictions = self.prediction(self.projection(model.embed(torch.cat([x1, x2])))).float()
        targets = self.momentum_encoder(torch.cat([x2, x1])).float()
        loss = self.criterion(predictions, targets)
        return loss, {"loss": loss.item(), **logs}
