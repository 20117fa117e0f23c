"""SimCLR as an objective for the one training loop.

Reference: Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020. The projection head and NT-Xent loss are lightly's.
"""

from __future__ import annotations

from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor, nn

from medtl.train.objectives import Objective


class SimCLR(Objective):
    """NT-Xent between the projections of two views of each image.

    Expects batches with ``view1`` and ``view2``: (B, C, *spatial) tensors from
    :func:`medtl.data.transforms.ssl_views_transform`. The model must provide ``embed(x) -> (B, D)``.

    Args:
        embedding_dim: D, the backbone's pooled feature size (``backbone.num_features``).
        projection_dim: output size of the projection head.
        hidden_dim: hidden size of the projection head (default: ``embedding_dim``).
        temperature: NT-Xent temperature; 0.1–0.5 is the usual range.

    Examples:
        >>> objective = SimCLR(embedding_dim=backbone.num_features)
        >>> loss, logs = objective(backbone, {"view1": x1, "view2": x2})
    """

    def __init__(self, embedding_dim: int, projection_dim: int = 128, hidden_dim: int | None = None,
                 temperature: float = 0.2) -> None:
        super().__init__()
        if embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive (the backbone's num_features), got {embedding_dim}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.projection = SimCLRProjectionHead(embedding_dim, hidden_dim or embedding_dim, projection_dim)
        self.criterion = NTXentLoss(temperature=temperature)

    def forward(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        # One pass per view, as lightly's reference loop does: BatchNorm statistics per view, and on CPU two
        # B-image passes are faster than one 2B-image pass (activations stay in cache)
        z1 = self.projection(model.embed(batch["view1"])).float()
        z2 = self.projection(model.embed(batch["view2"])).float()
        loss = self.criterion(z1, z2)
        return loss, {"loss": loss.item()}
