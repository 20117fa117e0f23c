"""Pure maths of domain adaptation: tensors in, tensors out, no state."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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


def _pairwise_squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """(N, D), (M, D) -> (N, M) squared Euclidean distances, clamped at 0 (no sqrt: its gradient at 0 is inf)."""
    d = (x * x).sum(1, keepdim=True) + (y * y).sum(1).unsqueeze(0) - 2.0 * x @ y.T
    return d.clamp_min(0.0)


def _check_features(name: str, source: Tensor, target: Tensor) -> None:
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"{name} expects (N, D) features of equal D, got {tuple(source.shape)} and "
                         f"{tuple(target.shape)}")
    if source.shape[0] < 1 or target.shape[0] < 1:
        raise ValueError(f"{name} needs at least one source and one target sample, got {source.shape[0]} and "
                         f"{target.shape[0]}")


MMD_BANDWIDTH_MULTIPLIERS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
"""Multiples of the median distance used as kernel bandwidths by :func:`mk_mmd` by default (2^-2 … 2^2)."""


def median_heuristic_bandwidths(source: Tensor, target: Tensor,
                                multipliers: Sequence[float] = MMD_BANDWIDTH_MULTIPLIERS) -> Tensor:
    """Gaussian-kernel bandwidths from the median heuristic (Gretton et al., JMLR 2012), without gradient.

    Args:
        source: (Ns, D) features.
        target: (Nt, D) features, Ns + Nt >= 2.
        multipliers: factors applied to the median distance.

    Returns:
        (len(multipliers),) bandwidths σ: the median Euclidean distance between distinct points of the
        pooled sample times each multiplier (a median of 0, all points equal, is replaced by 1).

    Examples:
        >>> median_heuristic_bandwidths(torch.zeros(2, 3), torch.ones(2, 3), multipliers=(1.0,))
        tensor([1.7321])
    """
    _check_features("median_heuristic_bandwidths", source, target)
    with torch.no_grad():
        z = torch.cat([source, target]).detach().float()
        d2 = _pairwise_squared_distances(z, z)
        n = z.shape[0]
        off_diagonal = d2[~torch.eye(n, dtype=torch.bool, device=z.device)]
        median = off_diagonal.median().sqrt()
        median = torch.where(median > 0, median, torch.ones_like(median))
        return median * torch.tensor(list(multipliers), dtype=z.dtype, device=z.device)


def mk_mmd(source: Tensor, target: Tensor, bandwidths: Sequence[float] | Tensor | None = None) -> Tensor:
    """Multi-kernel maximum mean discrepancy (MK-MMD), the biased (V-statistic) estimate of MMD².

    Reference: Long et al., "Learning Transferable Features with Deep Adaptation Networks", ICML 2015
    (DAN); estimator from Gretton et al., "A Kernel Two-Sample Test", JMLR 2012.

    The kernel is the equal-weight combination of Gaussian kernels
    ``k(x, y) = (1/K) Σ_u exp(-||x - y||² / (2 σ_u²))`` (DAN's convex combination with uniform β), and

    ``MMD² = mean k(xs, xs') + mean k(xt, xt') - 2 mean k(xs, xt)``

    with every mean over all pairs, diagonal included. This biased estimate is the squared RKHS distance
    between the two empirical mean embeddings: it is never negative, exactly 0 when the two samples are
    the same points, and its value lies in [0, 2]. (The unbiased U-statistic drops the diagonal terms
    and can be negative.) Computed in float32 with autocast off.

    Args:
        source: (Ns, D) source features, Ns >= 1.
        target: (Nt, D) target features, Nt >= 1, Ns + Nt >= 2.
        bandwidths: kernel widths σ_u, each > 0; ``None`` = the median heuristic × {2^-2, 2^-1, 1, 2, 2^2}
            (:func:`median_heuristic_bandwidths`, computed on the batch without gradient).

    Returns:
        Scalar tensor, differentiable with respect to both inputs.

    Examples:
        >>> x = torch.randn(64, 8)
        >>> mk_mmd(x, x).item()
        0.0
        >>> mk_mmd(x, x + 3.0) > mk_mmd(x, x + 1.0)
        tensor(True)
    """
    _check_features("mk_mmd", source, target)
    if source.shape[0] + target.shape[0] < 2:
        raise ValueError("mk_mmd needs at least two samples in total")
    with torch.autocast(device_type=source.device.type, enabled=False):
        xs, xt = source.float(), target.float()
        if bandwidths is None:
            sigma = median_heuristic_bandwidths(xs, xt)
        else:
            sigma = torch.as_tensor(bandwidths, dtype=torch.float32, device=xs.device).detach().flatten()
            if sigma.numel() == 0 or not bool((sigma > 0).all()):
                raise ValueError(f"mk_mmd bandwidths must be a non-empty list of positive numbers, got {bandwidths}")
        gamma = (1.0 / (2.0 * sigma**2)).view(-1, 1, 1)

        def kernel_mean(a: Tensor, b: Tensor) -> Tensor:
            return torch.exp(-gamma * _pairwise_squared_distances(a, b).unsqueeze(0)).mean()

        return kernel_mean(xs, xs) + kernel_mean(xt, xt) - 2.0 * kernel_mean(xs, xt)


def jdot_cost(source: Tensor, target: Tensor, source_labels: Tensor | None = None,
              target_logits: Tensor | None = None, label_weight: float = 0.0) -> Tensor:
    """DeepJDOT ground cost between every source and every target sample of a batch.

    Reference: Damodaran et al., "DeepJDOT: Deep Joint Distribution Optimal Transport for Unsupervised
    Domain Adaptation", ECCV 2018.

    ``C[i, j] = ||source[i] - target[j]||² + label_weight × CE(target_logits[j], source_labels[i])``:
    the feature term moves target features towards source ones, the label term asks the classifier to
    give a target sample the label of the source samples it is transported to. Source samples labelled
    ``-1`` (ignored, as in the task loss) contribute no label term. Computed in float32 with autocast off.

    Args:
        source: (Ns, D) source embeddings.
        target: (Nt, D) target embeddings.
        source_labels: (Ns,) int64 class indices; required when ``label_weight > 0``.
        target_logits: (Nt, C) classifier outputs on the target; required when ``label_weight > 0``.
        label_weight: weight of the label term, >= 0.

    Returns:
        (Ns, Nt) cost, differentiable with respect to the embeddings and logits.

    Examples:
        >>> jdot_cost(torch.zeros(2, 3), torch.ones(4, 3)).shape
        torch.Size([2, 4])
    """
    _check_features("jdot_cost", source, target)
    if label_weight < 0:
        raise ValueError(f"label_weight must be >= 0, got {label_weight}")
    with torch.autocast(device_type=source.device.type, enabled=False):
        cost = _pairwise_squared_distances(source.float(), target.float())
        if label_weight > 0:
            if source_labels is None or target_logits is None:
                raise ValueError("jdot_cost with label_weight > 0 needs source_labels (Ns,) and target_logits "
                                 "(Nt, C); pass both or set label_weight=0")
            if source_labels.shape != (source.shape[0],) or target_logits.shape[0] != target.shape[0]:
                raise ValueError(f"source_labels must be ({source.shape[0]},) and target_logits "
                                 f"({target.shape[0]}, C), "
                                 f"got {tuple(source_labels.shape)} and {tuple(target_logits.shape)}")
            log_prob = torch.log_softmax(target_logits.float(), dim=1)  # (Nt, C)
            known = source_labels >= 0
            ce = -log_prob[:, source_labels.clamp_min(0)].T  # (Ns, Nt): -log p_j(y_i)
            cost = cost + label_weight * ce * known.unsqueeze(1)
        return cost


@torch.no_grad()
def exact_ot_plan(cost: Tensor) -> Tensor:
    """Exact optimal-transport plan between uniform marginals (network simplex, POT's ``ot.emd``).

    Reference: Flamary et al., "POT: Python Optimal Transport", JMLR 2021.

    Args:
        cost: (Ns, Nt) ground cost; used without gradient (the plan is a constant for the loss).

    Returns:
        (Ns, Nt) plan ``γ >= 0`` with row sums ``1/Ns`` and column sums ``1/Nt``, same dtype and device
        as ``cost``.

    Examples:
        >>> exact_ot_plan(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        tensor([[0.5000, 0.0000],
                [0.0000, 0.5000]])
    """
    import ot  # POT: imported here so that importing medtl.adapt does not load it

    if cost.ndim != 2 or cost.shape[0] < 1 or cost.shape[1] < 1:
        raise ValueError(f"exact_ot_plan expects a non-empty (Ns, Nt) cost matrix, got {tuple(cost.shape)}")
    if not bool(torch.isfinite(cost).all()):
        raise ValueError("exact_ot_plan: the cost matrix has non-finite entries (check the embeddings for NaN/inf)")
    m = cost.detach().double().cpu().numpy()
    a = np.full(m.shape[0], 1.0 / m.shape[0])
    b = np.full(m.shape[1], 1.0 / m.shape[1])
    plan = ot.emd(a, b, m)
    return torch.from_numpy(plan).to(device=cost.device, dtype=cost.dtype)


def ot_alignment_loss(source: Tensor, target: Tensor, source_labels: Tensor | None = None,
                      target_logits: Tensor | None = None, label_weight: float = 0.0) -> Tensor:
    """DeepJDOT alignment loss ``<γ, C>``: the exact OT plan γ is computed without gradient, the cost C with.

    Reference: Damodaran et al., "DeepJDOT", ECCV 2018 (the plan is re-solved on every mini-batch and
    held fixed while the network is updated, their alternating optimisation).

    Args:
        source: (Ns, D) source embeddings.
        target: (Nt, D) target embeddings.
        source_labels: (Ns,) class indices; required when ``label_weight > 0``.
        target_logits: (Nt, C) target classifier outputs; required when ``label_weight > 0``.
        label_weight: weight of the label term of :func:`jdot_cost`.

    Returns:
        Scalar tensor >= 0: the optimal transport cost between the two batches (≈ 0 for identical batches:
        squared distances come from ``|a|² + |b|² - 2ab``, exact up to float rounding).

    Examples:
        >>> x = torch.randn(8, 4)
        >>> round(ot_alignment_loss(x, x).item(), 5)
        0.0
    """
    cost = jdot_cost(source, target, source_labels, target_logits, label_weight)
    return (exact_ot_plan(cost) * cost).sum()


def prediction_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of each softmax prediction, computed in float32.

    Reference: Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021.

    Args:
        logits: (B, C) classifier outputs.

    Returns:
        (B,) entropies, each in [0, log C].

    Examples:
        >>> prediction_entropy(torch.zeros(1, 2))
        tensor([0.6931])
    """
    if logits.ndim != 2:
        raise ValueError(f"prediction_entropy expects (B, C) logits, got {tuple(logits.shape)}")
    log_prob = torch.log_softmax(logits.float(), dim=1)
    return -(log_prob.exp() * log_prob).sum(1)


def fixmatch_loss(weak_logits: Tensor, strong_logits: Tensor, threshold: float = 0.95) -> tuple[Tensor, Tensor]:
    """FixMatch consistency: cross-entropy of strong-view predictions against confident weak-view pseudo-labels.

    Reference: Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
    Confidence", NeurIPS 2020.

    Pseudo-labels are the argmax of the weak view's softmax, taken without gradient; only samples whose
    top probability is ``>= threshold`` count. As in the paper, the masked per-sample losses are
    averaged over the whole batch (``1/B Σ mask·CE``), so the term grows as more samples become
    confident and is exactly 0 when none is.

    Args:
        weak_logits: (B, C) outputs on the weakly augmented view (no gradient flows into them).
        strong_logits: (B, C) outputs on the strongly augmented view of the same images.
        threshold: confidence a pseudo-label needs, in [0, 1].

    Returns:
        ``(loss, mask)``: scalar loss and the (B,) boolean mask of confident samples.

    Examples:
        >>> loss, mask = fixmatch_loss(torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 0.0]]), threshold=0.9)
        >>> round(loss.item(), 4), mask.tolist()
        (0.6931, [True])
    """
    if weak_logits.ndim != 2 or weak_logits.shape != strong_logits.shape:
        raise ValueError(f"fixmatch_loss expects weak and strong (B, C) logits of the same shape, got "
                         f"{tuple(weak_logits.shape)} and {tuple(strong_logits.shape)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    with torch.no_grad():
        confidence, pseudo_labels = torch.softmax(weak_logits.detach().float(), dim=1).max(1)
        mask = confidence >= threshold
    per_sample = torch.nn.functional.cross_entropy(strong_logits.float(), pseudo_labels, reduction="none")
    return torch.where(mask, per_sample, torch.zeros_like(per_sample)).mean(), mask
