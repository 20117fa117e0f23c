"""Self-supervised objectives built from lightly's losses, heads and memory banks.

Every method is an :class:`~medtl.train.objectives.Objective` on ``{"view1", "view2"}`` batches, trained
by :func:`medtl.train.fit`; :func:`build_ssl_objective` builds any of them from the pretraining settings.
:class:`~medtl.ssl.monitor.KnnMonitor` tracks the representation with a k-NN classifier while training.
"""

from __future__ import annotations

from torch import nn

from medtl.ssl.byol import BYOL
from medtl.ssl.moco import MoCo, MomentumEncoder
from medtl.ssl.monitor import KnnMonitor, embed_loader
from medtl.ssl.simclr import SimCLR
from medtl.ssl.vicreg import VICReg
from medtl.train.objectives import Objective

SSL_METHODS: dict[str, type[Objective]] = {"simclr": SimCLR, "moco": MoCo, "byol": BYOL, "vicreg": VICReg}


def build_ssl_objective(method: str, backbone: nn.Module, *, projection_dim: int = 128, temperature: float = 0.2,
                        total_steps: int | None = None) -> Objective:
    """The self-supervised objective ``method`` for ``backbone``, with each method's other settings at
    their defaults.

    Args:
        method: a key of :data:`SSL_METHODS`: ``simclr``, ``moco``, ``byol`` or ``vicreg``.
        backbone: the network :func:`medtl.train.fit` will train (``embed(x) -> (B, D)``, ``num_features``).
            MoCo and BYOL copy it into their momentum encoder here, so build the objective after the
            backbone's weights are loaded and before training.
        projection_dim: output size of the projection head (VICReg's expander, BYOL's heads).
        temperature: softmax temperature of the contrastive methods (simclr, moco); byol and vicreg have
            none and ignore it.
        total_steps: steps of the whole run (epochs x batches per epoch): moco and byol raise their
            momentum from its start value to 1 along a cosine over it; None keeps the momentum constant.

    Returns:
        An :class:`~medtl.train.objectives.Objective` on ``{"view1", "view2"}`` batches.

    Examples:
        >>> objective = build_ssl_objective("moco", backbone, projection_dim=128, temperature=0.2,
        ...                                 total_steps=cfg.train.epochs * len(loader))
        >>> fit(backbone, objective, loader, cfg.train)
    """
    if method == "simclr":
        return SimCLR(backbone.num_features, projection_dim, temperature=temperature)
    if method == "moco":
        return MoCo(backbone, projection_dim, temperature=temperature, total_steps=total_steps)
    if method == "byol":
        return BYOL(backbone, projection_dim, total_steps=total_steps)
    if method == "vicreg":
        return VICReg(backbone.num_features, projection_dim)
    raise ValueError(f"unknown self-supervised method {method!r}; choose one of {sorted(SSL_METHODS)}")


__all__ = ["BYOL", "SSL_METHODS", "KnnMonitor", "MoCo", "MomentumEncoder", "SimCLR", "VICReg", "build_ssl_objective",
           "embed_loader"]
