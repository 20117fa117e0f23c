"""Transferability scores: how well a frozen backbone's features suit a labeled target task.

Pure functions of ``features`` (N, D) and integer ``labels`` (N,); higher is better.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def logme(features: np.ndarray, labels: np.ndarray, max_iter: int = 100, tol: float = 1e-3) -> float:
    """LogME: mean per-class log marginal evidence of a Bayesian linear model on the features.

    Reference: You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer
    Learning", ICML 2021. Each class's one-hot target is fitted by ``y = F w + ε`` with
    ``w ~ N(0, α⁻¹I)``, ``ε ~ N(0, β⁻¹)``; α and β maximise the evidence by MacKay's fixed point,
    computed once from the SVD of ``F``.

    Args:
        features: (N, D) embeddings.
        labels: (N,) integer class labels.

    Returns:
        The evidence per sample, averaged over classes (comparable across backbones on the same data).
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    _check_xy(f, y)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2
    evidences = []
    for cls in np.unique(y):
        target = (y == cls).astype(np.float64)
        z2 = (u.T @ target) ** 2
        residual_out = max(float(target @ target - z2.sum()), 0.0)  # part of y outside F's column space
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            t = alpha / beta
            gamma = float((sigma / (sigma + t)).sum())
            m2 = float((sigma * z2 / (t + sigma) ** 2).sum())
            res2 = float((z2 * (t / (t + sigma)) ** 2).sum()) + residual_out
            alpha = gamma / (m2 + 1e-12)
            beta = (n - gamma) / (res2 + 1e-12)
            if abs(alpha / beta - t) / t < tol:
                break
        t = alpha / beta
        m2 = float((sigma * z2 / (t + sigma) ** 2).sum())
        res2 = float((z2 * (t / (t + sigma)) ** 2).sum()) + residual_out
        log_det = float(np.log(alpha + beta * sigma).sum()) + (d - sigma.size) * np.log(alpha)
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * log_det - beta / 2 * res2
                    - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def linear_probe_auc(features: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None,
                     folds: int = 3, seed: int = 0) -> float:
    """Cross-validated ROC AUC of a logistic-regression probe on standardised features.

    Folds are grouped by ``groups`` (patient ids) so no patient is in both train and test folds.
    Multi-class labels use one-vs-rest macro AUC.

    Returns:
        Mean AUC over folds.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    _check_xy(f, y)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    folds = min(folds, int(np.bincount(np.unique(y, return_inverse=True)[1]).min()))
    if folds < 2:
        raise ValueError("linear_probe_auc needs at least 2 samples of every class")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    aucs = []
    for train, test in splitter.split(f, y, groups):
        if len(np.unique(y[test])) < 2:
            continue
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
        probe.fit(f[train], y[train])
        proba = probe.predict_proba(f[test])
        aucs.append(roc_auc_score(y[test], proba[:, 1]) if proba.shape[1] == 2
                    else roc_auc_score(y[test], proba, multi_class="ovr"))
    return float(np.mean(aucs)) if aucs else float("nan")


def _check_xy(features: np.ndarray, labels: np.ndarray) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {features.shape}")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be (N,) = ({features.shape[0]},), got {labels.shape}")
    if len(np.unique(labels)) < 2:
        raise ValueError("transferability scores need at least two classes in labels")
