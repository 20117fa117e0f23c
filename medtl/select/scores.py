"""Transferability scores: how well a frozen backbone suits a labeled target task, without fine-tuning it.

Pure functions of numpy arrays; higher is better for every score. Feature scores (``logme``, ``h_score``,
``linear_probe_auc``, ``knn_cv_accuracy``) take the backbone's ``features`` (N, D); source-head scores (``leep``,
``nce``) take what the backbone's *source* classifier (e.g. ImageNet's 1000 classes) predicts on the N target
images, so they apply only to backbones that have one. ``labels`` (N,) are the target classes, any hashable values.
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import ledoit_wolf_shrinkage
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

    Args:
        features: (N, D) embeddings.
        labels: (N,) class labels.
        groups: (N,) patient ids, or None to treat every image as its own patient.
        folds: cross-validation folds (capped at the smallest class count and at the number of groups).
        seed: random state of the fold assignment.

    Returns:
        Mean AUC over the folds whose test part holds both classes (NaN if none does).
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    _check_xy(f, y)
    aucs = []
    for train, test in _grouped_folds(y, groups, folds, seed, "linear_probe_auc"):
        if len(np.unique(y[test])) < 2:
            continue
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
        probe.fit(f[train], y[train])
        proba = probe.predict_proba(f[test])
        aucs.append(roc_auc_score(y[test], proba[:, 1]) if proba.shape[1] == 2
                    else roc_auc_score(y[test], proba, multi_class="ovr"))
    return float(np.mean(aucs)) if aucs else float("nan")


def knn_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, k: int = 20, temperature: float = 0.07) -> float:
    """Accuracy of a weighted k-nearest-neighbour classifier on cosine similarity of embeddings.

    The monitor of self-supervised pretraining (Wu et al., "Unsupervised Feature Learning via Non-Parametric
    Instance Discrimination", CVPR 2018; also used by DINO): each test embedding votes with its ``k`` most
    similar training embeddings, each weighted by ``exp(similarity / temperature)``.

    Args:
        train_features: (N, D) embeddings with known labels.
        train_labels: (N,) integer labels.
        test_features: (M, D) embeddings to classify.
        test_labels: (M,) their true labels.
        k: neighbours per vote (capped at N).
        temperature: softness of the similarity weights; smaller trusts the nearest neighbours more.

    Returns:
        Fraction of the M test embeddings classified correctly.

    Examples:
        >>> knn_accuracy(np.eye(2), np.array([0, 1]), np.eye(2), np.array([0, 1]), k=1)
        1.0
    """
    train = np.asarray(train_features, dtype=np.float64)
    test = np.asarray(test_features, dtype=np.float64)
    y_train, y_test = np.asarray(train_labels), np.asarray(test_labels)
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) with the same D, got {train.shape} and {test.shape}")
    if y_train.shape != (train.shape[0],) or y_test.shape != (test.shape[0],):
        raise ValueError("labels must have one entry per embedding")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
    test = test / np.maximum(np.linalg.norm(test, axis=1, keepdims=True), 1e-12)
    classes, train_index = np.unique(y_train, return_inverse=True)
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), 1024):  # bounded memory: a (1024, N) similarity block at a time
        similarity = test[start:start + 1024] @ train.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
        votes = np.zeros((len(nearest), len(classes)))
        np.add.at(votes, (np.arange(len(nearest))[:, None], train_index[nearest]), weights)
        correct += int((classes[votes.argmax(1)] == y_test[start:start + 1024]).sum())
    return correct / max(1, len(test))


def knn_cv_accuracy(features: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None, folds: int = 3,
                    k: int = 20, temperature: float = 0.07, seed: int = 0) -> float:
    """Cross-validated accuracy of the weighted kNN classifier of :func:`knn_accuracy` on the features.

    A non-parametric score: it asks only that same-class images lie near each other, with no linear model in
    between. Folds are stratified by label and grouped by ``groups`` (patient ids) so no patient's images vote
    for each other.

    Args:
        features: (N, D) embeddings.
        labels: (N,) class labels.
        groups: (N,) patient ids, or None to treat every image as its own patient.
        folds: cross-validation folds (capped at the smallest class count and at the number of groups).
        k: neighbours per vote; temperature: softness of their weights (see :func:`knn_accuracy`).
        seed: random state of the fold assignment.

    Returns:
        Mean accuracy over the folds.

    Examples:
        >>> y = np.repeat([0, 1], 10)
        >>> knn_cv_accuracy(np.eye(2)[y] + 0.01 * np.random.default_rng(0).normal(size=(20, 2)), y, k=3)
        1.0
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    _check_xy(f, y)
    accuracies = [knn_accuracy(f[train], y[train], f[test], y[test], k=k, temperature=temperature)
                  for train, test in _grouped_folds(y, groups, folds, seed, "knn_cv_accuracy")]
    return float(np.mean(accuracies))


def h_score(features: np.ndarray, labels: np.ndarray, shrinkage: float | None = None) -> float:
    """Regularised H-score: how much of the features' variance lies between the class means.

    References: Bao et al., "An Information-Theoretic Approach to Transferability in Task Transfer Learning",
    ICIP 2019, define ``H = tr(cov(f)⁻¹ cov(E[f | y]))``. The empirical ``cov(f)`` is singular or badly
    conditioned when D is large and N small (a 1280-D embedding of a few hundred scans), which makes H erratic;
    following Ibrahim et al., "Newer is not always better: Rethinking transferability metrics, their
    peculiarities, stability and performance", ECML PKDD 2022, both covariances are shrunk towards a scaled
    identity by the Ledoit-Wolf coefficient α (Ledoit & Wolf, J. Multivariate Anal. 2004, via
    :func:`sklearn.covariance.ledoit_wolf_shrinkage`):
    ``H_α = tr(((1 - α) cov(f) + α μ I)⁻¹ (1 - α) cov(E[f | y]))`` with ``μ = tr(cov(f)) / D``.
    Covariances are the maximum-likelihood ones (divided by N), so ``cov(f) = within + between`` exactly and
    ``0 ≤ H_α ≤ C - 1`` for C classes (C - 1 when the classes are perfectly separable).

    H_α is unchanged by translating, rotating or uniformly rescaling the features; the unregularised
    H (``shrinkage=0``) is unchanged by any invertible linear map of them. H_α is 0 when Ledoit-Wolf shrinks
    fully (α = 1), i.e. when the features' covariance cannot be told from isotropic noise at this N.

    Args:
        features: (N, D) embeddings.
        labels: (N,) class labels.
        shrinkage: α in [0, 1]; None estimates it by Ledoit-Wolf, 0 gives Bao et al.'s H-score (a
            pseudo-inverse when cov(f) is singular).

    Returns:
        H_α, in [0, C - 1].

    Examples:
        >>> h_score(np.array([[0.0], [1.0], [1.0], [3.0]]), np.array([0, 0, 1, 1]))  # (9/16) / (19/16)
        0.47368...
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    _check_xy(f, y)
    if shrinkage is not None and not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1] or None (Ledoit-Wolf estimate), got {shrinkage}")
    n, d = f.shape
    centred = f - f.mean(axis=0)
    alpha = ledoit_wolf_shrinkage(centred, assume_centered=True) if shrinkage is None else float(shrinkage)
    mean_variance = float((centred**2).sum()) / (n * d)  # μ = tr(cov(f)) / D
    classes, index = np.unique(y, return_inverse=True)
    counts = np.bincount(index)
    class_means = np.zeros((len(classes), d))
    np.add.at(class_means, index, centred)
    class_means /= counts[:, None]
    # The class means lie in the span of the centred features, where cov(f) = V diag(s²/N) Vᵀ (thin SVD): the
    # shrunk covariance need only be inverted there, in O(N D min(N, D)) rather than O(D³) for D × D.
    _, singular_values, vt = np.linalg.svd(centred, full_matrices=False)
    spanned = singular_values > singular_values.max(initial=0.0) * max(n, d) * np.finfo(np.float64).eps
    if not spanned.any():  # constant features carry no information about the labels
        return 0.0
    variances = (1 - alpha) * singular_values[spanned] ** 2 / n + alpha * mean_variance
    projected = class_means @ vt[spanned].T
    return float((1 - alpha) * (counts / n) @ (projected**2 / variances).sum(axis=1))


def leep(source_probabilities: np.ndarray, labels: np.ndarray) -> float:
    """LEEP: log expected empirical prediction of the source classifier re-labelled to the target classes.

    Reference: Nguyen et al., "LEEP: A New Measure to Evaluate Transferability of Learned Representations",
    ICML 2020. With θ(x) the source head's distribution over its Z classes, the empirical joint
    ``P(y, z) = (1/N) Σ_{i: y_i = y} θ(x_i)_z`` gives ``P(y | z)``, and
    ``LEEP = (1/N) Σ_i log Σ_z P(y_i | z) θ(x_i)_z``: the average log-likelihood of the target labels under
    the classifier that first predicts a source class, then a target class from it.

    Args:
        source_probabilities: (N, Z) source-class probabilities (softmax of the source head's logits; rows
            sum to 1).
        labels: (N,) target class labels.

    Returns:
        LEEP, in [-H(Y), 0] nats: -H(Y) (the label entropy) for a source head that says nothing about the
        target, 0 when it determines the target label.

    Examples:
        >>> leep(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]))  # log(74/99)
        -0.29105...
    """
    theta = np.asarray(source_probabilities, dtype=np.float64)
    y = np.asarray(labels)
    _check_probabilities(theta, y)
    n = len(y)
    _, index = np.unique(y, return_inverse=True)
    joint = np.zeros((index.max() + 1, theta.shape[1]))
    np.add.at(joint, index, theta / n)
    marginal = joint.sum(axis=0)
    # A source class no image gives any probability never contributes (its θ is 0 everywhere): P(y | z) := 0.
    conditional = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)
    expected = np.einsum("nz,nz->n", theta, conditional[index])
    return float(np.log(np.maximum(expected, np.finfo(np.float64).tiny)).mean())


def nce(source_labels: np.ndarray, labels: np.ndarray) -> float:
    """NCE: negative conditional entropy of the target labels given the source classifier's predicted labels.

    Reference: Tran et al., "Transferability and Hardness of Supervised Classification Tasks", ICCV 2019.
    ``NCE = -H(Y | Z) = Σ_{y, z} P(y, z) log P(y | z)`` over the empirical joint of the target label Y and the
    source label Z of each image, here the source head's prediction (``source_probabilities.argmax(1)``).

    Args:
        source_labels: (N,) source labels of the target images (any hashable values).
        labels: (N,) target class labels.

    Returns:
        NCE in [-H(Y), 0] nats: 0 when the source label determines the target label.

    Examples:
        >>> nce(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))  # -(1/2) log 2
        -0.34657...
    """
    z = np.asarray(source_labels)
    y = np.asarray(labels)
    if y.ndim != 1 or z.shape != y.shape:
        raise ValueError(f"source_labels and labels must both be (N,), got {z.shape} and {y.shape}")
    if len(np.unique(y)) < 2:
        raise ValueError("transferability scores need at least two classes in labels")
    _, y_index = np.unique(y, return_inverse=True)
    _, z_index = np.unique(z, return_inverse=True)
    joint = np.zeros((z_index.max() + 1, y_index.max() + 1))
    np.add.at(joint, (z_index, y_index), 1.0 / len(y))
    conditional = joint / joint.sum(axis=1, keepdims=True)
    observed = joint > 0
    return float((joint[observed] * np.log(conditional[observed])).sum())


def _check_xy(features: np.ndarray, labels: np.ndarray) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {features.shape}")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be (N,) = ({features.shape[0]},), got {labels.shape}")
    if len(np.unique(labels)) < 2:
        raise ValueError("transferability scores need at least two classes in labels")


def _check_probabilities(probabilities: np.ndarray, labels: np.ndarray) -> None:
    if probabilities.ndim != 2 or labels.shape != (probabilities.shape[0],):
        raise ValueError(f"source_probabilities must be (N, Z) and labels (N,), got {probabilities.shape} "
                         f"and {labels.shape}")
    if len(np.unique(labels)) < 2:
        raise ValueError("transferability scores need at least two classes in labels")
    if not np.isfinite(probabilities).all() or (probabilities < 0).any() or \
            not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("source_probabilities must be probabilities (non-negative, rows summing to 1): "
                         "apply a softmax to the source head's logits first")


def _grouped_folds(labels: np.ndarray, groups: np.ndarray | None, folds: int, seed: int,
                   score: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs, stratified by label, with each group (patient) in one fold only."""
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    if groups.shape != labels.shape:
        raise ValueError(f"groups must be (N,) = {labels.shape}, one patient id per image, got {groups.shape}")
    if folds < 2:
        raise ValueError(f"{score} needs folds >= 2, got {folds}")
    folds = min(folds, int(np.bincount(np.unique(labels, return_inverse=True)[1]).min()),
                len(np.unique(groups)))
    if folds < 2:
        raise ValueError(f"{score} needs at least 2 samples (and 2 patients) of every class for cross-validation")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros((len(labels), 1)), labels, groups))
