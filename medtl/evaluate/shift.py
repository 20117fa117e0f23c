"""Dataset-shift diagnostics between hospitals, from simple image statistics.

Pure functions: arrays in, numbers out. :func:`image_statistics` turns one preprocessed image into a
short vector of acquisition properties a radiographer would recognise (brightness, contrast, clipping,
sharpness, noise, ...); :func:`shift_diagnostics` compares the vectors of each hospital with those of
the reference (training) hospitals in three ways:

* **proxy A-distance** (Ben-David et al., "Analysis of Representations for Domain Adaptation",
  NeurIPS 2006): ``2 (1 − 2 ε)`` where ε is the cross-validated balanced error of a logistic-regression
  classifier that tries to tell the two hospitals' images apart. 0 = indistinguishable, 2 = perfectly
  separable. Balanced error, not plain error, so that unequal site sizes cannot fake a small distance.
* **MMD²** with a multi-kernel Gaussian kernel (:func:`medtl.adapt.functional.mk_mmd`) on the
  standardised statistics, with a permutation p-value (Gretton et al., JMLR 2012) that says whether
  the difference is beyond what two random halves of the pooled images would show.
* **standardised mean differences** (Cohen's d) per statistic, which name *what* differs.

Image statistics rather than model embeddings: they need no model, are identical for every method
compared in the report, and point a reviewer at a physical cause (a noisier detector, a different
processing curve) instead of at an abstract feature space.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.preprocessing import StandardScaler

from medtl.adapt.functional import median_heuristic_bandwidths, mk_mmd

IMAGE_STATISTICS: dict[str, str] = {
    "brightness": "mean intensity",
    "contrast": "standard deviation of intensity",
    "dark level": "5th intensity percentile",
    "bright level": "95th intensity percentile",
    "clipping": "fraction of pixels at the black or white limit",
    "histogram entropy": "spread of the intensity histogram, in bits",
    "edge strength": "mean gradient magnitude (sharpness)",
    "noise": "high-frequency noise level (Immerkær estimate)",
}
"""Name → plain description of each entry of :func:`image_statistics`, in order."""

_HIST_BINS = 64
# Immerkær (1996) kernel: the difference of two Laplacians, blind to linear ramps and edges to first order.
_NOISE_KERNEL = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])


def image_statistics(image: ArrayLike) -> NDArray[np.float64]:
    """Acquisition statistics of one preprocessed image, in the order of :data:`IMAGE_STATISTICS`.

    Args:
        image: intensities in [0, 1] (medtl's stored arrays), shape ``(H, W)``, ``(D, H, W)`` or either with
            leading channel axes of size 1 (``(1, H, W)``); values outside [0, 1] are clipped first. Volumes
            use all voxels for intensity and gradient statistics and their middle slice for the noise estimate.

    Returns:
        ``float64`` vector of length ``len(IMAGE_STATISTICS)``.

    Raises:
        ValueError: when the image is not 2D / 3D after dropping size-1 leading axes, is smaller than 3 × 3
            in-plane, or holds NaN / inf.

    Examples:
        >>> flat = image_statistics(np.full((16, 16), 0.5))
        >>> [round(float(v), 3) for v in flat[:2]], float(flat[-1])
        ([0.5, 0.0], 0.0)
    """
    x = np.asarray(image, dtype=np.float64)
    while x.ndim > 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim not in (2, 3):
        raise ValueError(f"image_statistics needs a 2D or 3D image (optionally with size-1 channel axes), got shape "
                         f"{np.shape(image)}")
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        raise ValueError(f"image_statistics needs at least 3 x 3 pixels in-plane, got shape {np.shape(image)}")
    if not np.isfinite(x).all():
        raise ValueError("image_statistics got NaN or inf pixels; the stored array is damaged: re-run ingest")
    x = np.clip(x, 0.0, 1.0)
    dark, bright = np.percentile(x, [5.0, 95.0])
    counts = np.histogram(x, bins=_HIST_BINS, range=(0.0, 1.0))[0].astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    gradients = np.gradient(x)
    edge = np.sqrt(sum(g * g for g in gradients)).mean()
    plane = x if x.ndim == 2 else x[x.shape[0] // 2]
    return np.array([x.mean(), x.std(), dark, bright, np.mean((x <= 0.0) | (x >= 1.0)), float(-(p * np.log2(p)).sum()),
                     edge, _immerkaer_noise(plane)])


def _immerkaer_noise(plane: NDArray[np.float64]) -> float:
    """Gaussian noise sigma of a 2D image: Immerkær, "Fast Noise Variance Estimation", CVIU 1996."""
    h, w = plane.shape
    response = np.zeros((h - 2, w - 2))
    for dy in range(3):
        for dx in range(3):
            response += _NOISE_KERNEL[dy, dx] * plane[dy:dy + h - 2, dx:dx + w - 2]
    return float(math.sqrt(math.pi / 2.0) * np.abs(response).mean() / 6.0)


def shift_diagnostics(features: ArrayLike, groups: ArrayLike, reference: str | Sequence[str], *,
                      names: Sequence[str] | None = None, n_permutations: int = 200, cv_folds: int = 5,
                      seed: int = 0) -> dict:
    """Compare every non-reference group's feature distribution with the pooled reference groups.

    Args:
        features: ``(N, D)`` one row per image (e.g. :func:`image_statistics`).
        groups: ``(N,)`` the hospital of each row.
        reference: the reference hospital, or several pooled (the training hospitals).
        names: the ``D`` feature names; default ``IMAGE_STATISTICS`` when ``D`` matches, else ``f0, f1, ...``.
        n_permutations: permutations of the MMD test; 0 = no p-value.
        cv_folds: folds of the domain classifier's cross-validation (fewer when a site has fewer images).
        seed: seed of the permutations and the fold assignment.

    Returns:
        ``{"reference": [...], "n_reference": int, "features": [...], "n_permutations", "cv_folds",
        "comparisons": [{"site", "n_site", "n_reference", "proxy_a_distance", "domain_balanced_accuracy",
        "mmd2", "mmd_p_value", "differences": [{"feature", "effect_size"}, ...], "notes": [...]}, ...]}``,
        one comparison per non-reference group in sorted order; ``differences`` are sorted by ``|effect_size|``,
        largest first. Quantities that cannot be computed (too few images) are NaN and explained in ``notes``.

    Raises:
        ValueError: on mismatched shapes, non-finite features, or a reference with no rows.
    """
    x = np.asarray(features, dtype=np.float64)
    g = np.asarray(groups).astype(str)
    if x.ndim != 2 or g.shape != (x.shape[0],):
        raise ValueError(f"features must be (N, D) and groups (N,), got shapes {x.shape} and {g.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf; compute them with image_statistics on valid images")
    refs = [reference] if isinstance(reference, str) else [str(r) for r in reference]
    is_ref = np.isin(g, refs)
    if not is_ref.any():
        raise ValueError(f"no rows belong to the reference {refs}; groups present: {sorted(set(g))}")
    if names is None:
        names = list(IMAGE_STATISTICS) if x.shape[1] == len(IMAGE_STATISTICS) else [f"f{i}" for i in range(x.shape[1])]
    names = [str(n) for n in names]
    if len(names) != x.shape[1]:
        raise ValueError(f"names has {len(names)} entries but features have {x.shape[1]} columns")
    if n_permutations < 0 or cv_folds < 2:
        raise ValueError(f"n_permutations must be >= 0 and cv_folds >= 2, got {n_permutations} and {cv_folds}")

    comparisons = [_compare(x[is_ref], x[g == site], site, names, n_permutations, cv_folds, seed)
                   for site in sorted(set(g[~is_ref]))]
    return {"reference": refs, "n_reference": int(is_ref.sum()), "features": names,
            "n_permutations": int(n_permutations), "cv_folds": int(cv_folds), "comparisons": comparisons}


def _compare(ref: NDArray[np.float64], site: NDArray[np.float64], name: str, names: list[str],
             n_permutations: int, cv_folds: int, seed: int) -> dict:
    notes: list[str] = []
    # Scale by the pooled spread so that every statistic counts alike in the kernel and the classifier;
    # constant statistics (scale 0) are left at 0 by StandardScaler and drop out.
    pooled = StandardScaler().fit(np.vstack([ref, site]))
    zr, zs = pooled.transform(ref), pooled.transform(site)

    pad, balanced = float("nan"), float("nan")
    folds = min(cv_folds, len(ref), len(site))
    if folds >= 2:
        z = np.vstack([zr, zs])
        y = np.r_[np.zeros(len(zr), dtype=int), np.ones(len(zs), dtype=int)]
        split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        classifier = LogisticRegression(max_iter=1000, class_weight="balanced")
        predicted = cross_val_predict(classifier, z, y, cv=split)
        balanced = float(balanced_accuracy_score(y, predicted))
        pad = float(min(max(2.0 * (1.0 - 2.0 * (1.0 - balanced)), 0.0), 2.0))
        if folds < cv_folds:
            notes.append(f"domain classifier cross-validated with {folds} folds (a site has only {folds} images)")
    else:
        notes.append("proxy A-distance needs at least 2 images per site")

    mmd2, p_value = float("nan"), float("nan")
    if len(zr) and len(zs):
        with torch.no_grad():
            tr, ts = torch.from_numpy(zr).float(), torch.from_numpy(zs).float()
            sigma = median_heuristic_bandwidths(tr, ts)  # fixed for the permutations: the test needs one kernel
            mmd2 = float(mk_mmd(tr, ts, sigma))
        if n_permutations:
            p_value = _permutation_p_value(np.vstack([zr, zs]), len(zr), sigma.double().numpy(), n_permutations, seed)

    spread = np.sqrt((ref.var(axis=0) + site.var(axis=0)) / 2.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        effect = np.where(spread > 0, (site.mean(axis=0) - ref.mean(axis=0)) / spread, 0.0)
    order = np.argsort(-np.abs(effect), kind="stable")
    differences = [{"feature": names[i], "effect_size": float(effect[i])} for i in order]
    return {"site": name, "n_site": int(len(site)), "n_reference": int(len(ref)), "proxy_a_distance": pad,
            "domain_balanced_accuracy": balanced, "mmd2": mmd2, "mmd_p_value": p_value,
            "differences": differences, "notes": notes}


def _permutation_p_value(pooled: NDArray[np.float64], n_first: int, sigma: NDArray[np.float64],
                         n_permutations: int, seed: int) -> float:
    """P-value of the MMD² two-sample test: how often a random split of the pooled rows is as far apart.

    The kernel matrix is built once, the same equal-weight Gaussian mixture as :func:`mk_mmd`, and every
    permutation's MMD² is read off it with one matrix product (a loop of ``mk_mmd`` calls is ~100x slower).
    """
    d2 = np.square(pooled[:, None, :] - pooled[None, :, :]).sum(-1)
    kernel = np.mean([np.exp(-d2 / (2.0 * s * s)) for s in sigma], axis=0)
    n, n_second = len(pooled), len(pooled) - n_first
    rng = np.random.default_rng(seed)
    first = np.zeros((n_permutations + 1, n))
    first[0, :n_first] = 1.0  # row 0: the observed split
    for row in first[1:]:
        row[rng.permutation(n)[:n_first]] = 1.0
    projected = first @ kernel
    within_first = (projected * first).sum(1)
    across = (projected * (1.0 - first)).sum(1)
    within_second = kernel.sum() - within_first - 2.0 * across
    mmd2 = within_first / n_first**2 + within_second / n_second**2 - 2.0 * across / (n_first * n_second)
    # a relative tolerance so that permutations equal to the observed split up to rounding count as "as large"
    exceed = int((mmd2[1:] >= mmd2[0] * (1.0 - 1e-9)).sum())
    return (1.0 + exceed) / (1.0 + n_permutations)
