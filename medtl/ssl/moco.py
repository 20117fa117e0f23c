"""MoCo v2 as an objective for the one training loop, and the momentum encoder it shares with BYOL.

References: He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020;
Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv:2003.04297, 2020 (MoCo v2:
MLP head, temperature 0.2). The head, the momentum update, the momentum schedule, the queue and the
contrastive loss are lightly's.
"""

from __future__ import annotations

import copy

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn

from medtl.train.objectives import Objective


class MomentumEncoder(nn.Module):
    """A frozen copy of a backbone and a head that follows them by an exponential moving average.

    The key encoder of MoCo and the target network of BYOL. The copy is made at construction so that
    :func:`medtl.train.fit` saves and resumes it with the objective; its parameters have
    ``requires_grad=False``, so ``fit`` never gives them to the optimizer. Each :meth:`update` sets
    ``target = m * target + (1 - m) * online`` (lightly's ``update_momentum``) with ``m`` rising from
    ``momentum`` to 1 along a cosine over ``total_steps`` updates (lightly's ``cosine_schedule``, as in
    BYOL), or fixed at ``momentum`` when ``total_steps`` is None. The update count is a saved buffer,
    so a resumed run continues the schedule where it stopped. BatchNorm running statistics are not
    averaged: the copy keeps its own, as in MoCo and BYOL.

    Args:
        backbone: the online network (must provide ``embed(x) -> (B, D)``); copied, not shared.
        head: the online projection head; copied, not shared.
        momentum: ``m`` at the first update, in [0, 1]; 0.99 suits runs of a few thousand steps,
            0.996-0.999 longer ones.
        total_steps: updates over the whole run (epochs x batches per epoch) for the cosine schedule;
            None keeps ``m`` constant.

    Examples:
        >>> target = MomentumEncoder(backbone, head, momentum=0.99, total_steps=1000)
        >>> target.update(backbone, head)      # once per training step
        >>> keys = target(images)               # (B, head output), no gradient
    """

    step: Tensor

    def __init__(self, backbone: nn.Module, head: nn.Module, momentum: float = 0.99,
                 total_steps: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] (0.99 for short runs, 0.999 for long ones), got {momentum}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 (epochs x batches per epoch) or None for a constant "
                             f"momentum, got {total_steps}")
        self.backbone = copy.deepcopy(backbone)
        self.head = copy.deepcopy(head)
        deactivate_requires_grad(self)
        self.momentum = momentum
        self.total_steps = total_steps
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def current_momentum(self) -> float:
        """The ``m`` the next :meth:`update` will use."""
        if self.total_steps is None:
            return self.momentum
        return cosine_schedule(min(int(self.step), self.total_steps), self.total_steps, self.momentum, 1.0)

    @torch.no_grad()
    def update(self, backbone: nn.Module, head: nn.Module) -> float:
        """Move the copy towards the online ``backbone`` and ``head`` (the ones it was copied from).

        Returns:
            The momentum ``m`` this update used.
        """
        m = self.current_momentum()
        update_momentum(backbone, self.backbone, m)
        update_momentum(head, self.head, m)
        self.step += 1
        return m

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, *S)`` images → ``(B, head output)`` projections, without gradient."""
        return self.head(self.backbone.embed(x))


class MoCo(Objective):
    """MoCo v2: InfoNCE between a query and the momentum encoder's key of the other view, against a queue.

    The query encoder is the model given to :meth:`forward` (the backbone being trained) followed by a
    2-layer MLP projection head; the key encoder is a :class:`MomentumEncoder` copy of both, made here.
    Negatives are the keys of earlier batches, held in lightly's memory bank (a FIFO queue). The loss is
    symmetric: each view is the query once and the key once, and both views' keys are enqueued.

    The queue, its pointer, the momentum encoder and its update count are part of ``state_dict()``, so
    :func:`medtl.train.fit` checkpoints and resumes them exactly. Expects batches with ``view1`` and
    ``view2``: (B, C, *spatial) tensors from :func:`medtl.data.transforms.ssl_views_transform` (2D or 3D).
    In training mode with gradients enabled, each call first moves the key encoder towards the current
    weights, then computes the loss and enqueues the keys; otherwise (``eval()`` or ``torch.no_grad()``)
    it only evaluates the loss, without gradient and leaving the queue and the key encoder's weights as
    they are.

    Args:
        backbone: the network that will be trained (must provide ``embed(x) -> (B, D)`` and
            ``num_features``); pass the same module to :func:`medtl.train.fit` and to :meth:`forward`.
        projection_dim: output size of the projection head (128 in MoCo v2).
        hidden_dim: hidden size of the projection head (default: ``backbone.num_features``, as MoCo v2's
            2048 for a ResNet-50).
        temperature: InfoNCE temperature (0.2 in MoCo v2).
        queue_size: negatives kept in the queue; at least a few batches (4096 is a good default for
            datasets of thousands of images, MoCo uses 65536 on ImageNet).
        momentum: key-encoder momentum at the first step, see :class:`MomentumEncoder`.
        total_steps: steps of the whole run, for the cosine momentum schedule; None keeps it constant.

    Examples:
        >>> objective = MoCo(backbone, total_steps=cfg.epochs * len(loader))
        >>> loss, logs = objective(backbone, {"view1": x1, "view2": x2})
    """

    def __init__(self, backbone: nn.Module, projection_dim: int = 128, hidden_dim: int | None = None,
                 temperature: float = 0.2, queue_size: int = 4096, momentum: float = 0.99,
                 total_steps: int | None = None) -> None:
        super().__init__()
        embedding_dim = _embedding_dim(backbone)
        _check_head_dims(projection_dim, hidden_dim)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (MoCo v2 uses 0.2), got {temperature}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1 (MoCo needs a queue of negatives; 4096 is typical), "
                             f"got {queue_size}; use SimCLR for in-batch negatives")
        self.projection = MoCoProjectionHead(embedding_dim, hidden_dim or embedding_dim, projection_dim)
        self.momentum_encoder = MomentumEncoder(backbone, self.projection, momentum, total_steps)
        self.criterion = NTXentLoss(temperature=temperature, memory_bank_size=(queue_size, projection_dim))
        queue = self.criterion.memory_bank
        # lightly keeps the queue out of state_dict(); a resumed run would restart from random negatives.
        for name in ("bank", "bank_ptr"):
            queue.register_buffer(name, getattr(queue, name), persistent=True)

    def forward(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        x1, x2 = batch["view1"], batch["view2"]
        train_step = self.training and torch.is_grad_enabled()
        logs = {"momentum": self.momentum_encoder.update(model, self.projection)} if train_step else {}
        queries = self.projection(model.embed(torch.cat([x1, x2]))).float()
        keys = self.momentum_encoder(torch.cat([x2, x1])).float()
        if not train_step:
            # lightly's loss enqueues the keys whenever the queries carry a gradient.
            queries = queries.detach()
        # One call for both directions: every query sees the same queue, and the queue never holds the
        # keys of the very images being contrasted.
        loss = self.criterion(queries, keys)
        return loss, {"loss": loss.item(), **logs}


def _embedding_dim(backbone: nn.Module) -> int:
    if not callable(getattr(backbone, "embed", None)) or not hasattr(backbone, "num_features"):
        raise TypeError(f"{type(backbone).__name__} needs embed(x) -> (B, D) and num_features; "
                        "build it with medtl.models.create_backbone")
    embedding_dim = int(backbone.num_features)
    if embedding_dim <= 0:
        raise ValueError(f"backbone.num_features must be positive, got {embedding_dim}")
    return embedding_dim


def _check_head_dims(projection_dim: int, hidden_dim: int | None) -> None:
    if projection_dim < 1:
        raise ValueError(f"projection_dim must be >= 1 (the projection head's output size), got {projection_dim}")
    if hidden_dim is not None and hidden_dim < 1:
        raise ValueError(f"hidden_dim must be >= 1, or None for the method's default, got {hidden_dim}")
