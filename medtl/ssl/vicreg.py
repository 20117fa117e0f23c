"""VICReg as an objective for the one training loop.

Reference: Bardes et al., "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
Learning", ICLR 2022. The expander (projection head) and the loss are lightly's.
"""

from __future__ import annotations

import torch
from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead
from torch import Tensor, nn

from medtl.train.objectives import Objective


class VICReg(Objective):
    """Invariance between the expansions of two views, plus a variance floor and decorrelation per view.

    ``loss = lambda * MSE(z1, z2) + mu * variance(z1, z2) + nu * covariance(z1, z2)``: the invariance term
    pulls the two views together, the variance hinge keeps every dimension's std above 1 over the batch
    and the covariance term decorrelates the dimensions, which together prevent collapse without
    negatives or a momentum encoder. Expects batches with ``view1`` and ``view2``: (B, C, *spatial)
    tensors from :func:`medtl.data.transforms.ssl_views_transform` (2D or 3D), B >= 2. The model must
    provide ``embed(x) -> (B, D)``.

    Args:
        embedding_dim: D, the backbone's pooled feature size (``backbone.num_features``).
        projection_dim: output size of the 3-layer expander (8192 in the paper; larger expanders help).
        hidden_dim: hidden size of the expander (default: ``projection_dim``, as in the paper).
        lambda_param: weight of the invariance term (25 in the paper).
        mu_param: weight of the variance term (25 in the paper).
        nu_param: weight of the covariance term (1 in the paper).

    Examples:
        >>> objective = VICReg(embedding_dim=backbone.num_features, projection_dim=2048)
        >>> loss, logs = objective(backbone, {"view1": x1, "view2": x2})
    """

    def __init__(self, embedding_dim: int, projection_dim: int = 2048, hidden_dim: int | None = None,
                 lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0) -> None:
        super().__init__()
        if embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive (the backbone's num_features), got {embedding_dim}")
        if projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1 (the expander's output size), got {projection_dim}")
        if hidden_dim is not None and hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, or None for projection_dim, got {hidden_dim}")
        if min(lambda_param, mu_param, nu_param) < 0:
            raise ValueError(f"lambda_param, mu_param and nu_param must be >= 0 (the paper uses 25, 25, 1), got "
                             f"{lambda_param}, {mu_param}, {nu_param}")
        self.projection = VICRegProjectionHead(embedding_dim, hidden_dim or projection_dim, projection_dim)
        self.criterion = VICRegLoss(lambda_param=lambda_param, mu_param=mu_param, nu_param=nu_param)

    def forward(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        x1, x2 = batch["view1"], batch["view2"]
        if x1.shape[0] < 2:
            raise ValueError(f"VICReg needs at least 2 images per batch (its variance term is a batch std), "
                             f"got {x1.shape[0]}; raise batch_size or use drop_last=True")
        z = self.projection(model.embed(torch.cat([x1, x2])))
        z1, z2 = z.float().chunk(2)
        loss = self.criterion(z1, z2)
        return loss, {"loss": loss.item()}
