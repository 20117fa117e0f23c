"""Pure maths of domain adaptation: tensors in, tensors out, no state."""

from __future__ import annotations

import torch
from torch import Tensor


def coral_loss(source: Tensor, target: Tensor) -> Tensor:
    """Deep CORAL: squared Frobenius distance between feature covariances, / (4 d²).

    Reference: Sun & Saenko, "Deep CORAL: Correlation Alignment for Deep Domain Adaptation", ECCV-W 2016.

    Args:
        source: (Ns, D) source features, Ns >= 2.
        target: (Nt, D) target features, Nt >= 2.

    Returns:
        Scalar tensor.
    """
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"coral_loss expects (N, D) features of equal D, got {tuple(source.shape)} and "
                         f"{tuple(target.shape)}")
    d = source.shape[1]
    cs = _covariance(source.float())
    ct = _covariance(target.float())
    return ((cs - ct) ** 2).sum() / (4.0 * d * d)


def _covariance(x: Tensor) -> Tensor:
    centered = x - x.mean(0, keepdim=True)
    return centered.T @ centered / max(1, x.shape[0] - 1)


@torch.no_grad()
def recompute_batchnorm_statistics(model: torch.nn.Module, batches, forward=None) -> int:
    """AdaBN: replace every BatchNorm's running mean/var by the statistics of ``batches``.

    Reference: Li et al., "Revisiting Batch Normalization For Practical Domain Adaptation", ICLR-W 2017.

    Momentum is set to ``None`` (cumulative average) while the batches pass, so the result is the
    exact average over all of them, independent of their order.

    Args:
        model: modified in place; left in eval mode.
        batches: iterable of input tensors (B, C, *spatial) on the model's device.
        forward: callable applied to each batch (default ``model``).

    Returns:
        The number of BatchNorm layers re-estimated.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    forward = forward or model
    for x in batches:
        forward(x)
    for m, (momentum, _) in zip(norms, saved):
        m.momentum = momentum
    model.eval()
    return len(norms)
