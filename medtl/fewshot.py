"""Few-shot classification with prototypical networks, for findings with a handful of labeled examples.

Reference: Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017. Each
class is represented by its *prototype*, the mean embedding of its labeled (support) examples; a query
is scored by its negative squared Euclidean distance to every prototype and a softmax over the classes
turns the scores into probabilities.

Three ways to use it:

* on a frozen backbone: embed the K labeled examples per class with
  :func:`medtl.train.inference.embeddings` and fit :class:`PrototypicalClassifier` on them;
* to measure how well a backbone suits few-shot use: :func:`evaluate_episodes`, the standard
  N-way K-shot protocol (mean accuracy over random episodes with a 95 % confidence interval);
* to train a backbone for it: :class:`PrototypicalLoss` with :func:`medtl.train.fit` on a loader
  whose batches are episodes drawn by :class:`EpisodeSampler`.

Examples:
    >>> support = embeddings(backbone, support_loader)                 # (K * classes, D)
    >>> clf = PrototypicalClassifier().fit(support, support_labels)
    >>> proba = clf.predict_proba(embeddings(backbone, query_loader))  # (M, classes)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y
from torch import Tensor, nn
from torch.utils.data import Sampler

from medtl.train.objectives import Objective

__all__ = ["EpisodeSampler", "PrototypicalClassifier", "PrototypicalLoss", "evaluate_episodes", "prototype_logits",
           "prototypes"]

Metric = Literal["euclidean", "cosine"]
# Cosine similarities lie in [-1, 1]: unscaled, the softmax over them is nearly uniform and the loss barely
# trains. 10 is the usual scale (Chen et al., "A Closer Look at Few-shot Classification", ICLR 2019).
DEFAULT_SCALE: dict[str, float] = {"euclidean": 1.0, "cosine": 10.0}


def prototypes(embeddings: Tensor, labels: Tensor, n_classes: int) -> Tensor:
    """Class prototypes: the mean embedding of each class (Snell et al. 2017, eq. 1).

    Args:
        embeddings: (N, D) support embeddings.
        labels: (N,) integer classes in ``[0, n_classes)``.
        n_classes: C, the number of prototypes; every class needs at least one example.

    Returns:
        (C, D) prototypes, row ``c`` the mean of the embeddings labeled ``c``, in ``embeddings``' dtype.

    Examples:
        >>> prototypes(torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]]), torch.tensor([0, 0, 1]), 2)
        tensor([[1., 0.],
                [5., 5.]])
    """
    if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(f"prototypes expects (N, D) embeddings and (N,) labels, got {tuple(embeddings.shape)} "
                         f"and {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"labels must lie in [0, n_classes={n_classes}), got values from {int(labels.min())} "
                         f"to {int(labels.max())}; map class names to 0..C-1 first")
    # A one-hot matrix product rather than index_add: deterministic on every device and differentiable.
    one_hot = F.one_hot(labels.long(), n_classes).to(embeddings.dtype)  # (N, C)
    counts = one_hot.sum(0)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {empty} have no support example, so they have no prototype; give every class "
                         "at least one example or lower n_classes")
    return (one_hot.T @ embeddings) / counts.unsqueeze(1)


def prototype_logits(queries: Tensor, prototypes: Tensor, metric: Metric = "euclidean",
                     scale: float | None = None) -> Tensor:
    """Scores of each query against each prototype, to be soft-maxed over classes.

    ``euclidean`` is the paper's choice, the negative squared distance (a linear model in the
    embedding, Snell et al. 2017 sec. 2.4); ``cosine`` is the scaled cosine similarity.

    Args:
        queries: (M, D) embeddings to classify.
        prototypes: (C, D) from :func:`prototypes`.
        metric: ``"euclidean"`` or ``"cosine"``.
        scale: multiplies the scores (the inverse of a softmax temperature); default
            ``DEFAULT_SCALE[metric]``: 1 for euclidean (the paper), 10 for cosine.

    Returns:
        (M, C) logits; larger means closer.

    Examples:
        >>> prototype_logits(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0], [3.0, 1.0]]))
        tensor([[-1., -4.]])
    """
    if metric not in DEFAULT_SCALE:
        raise ValueError(f"metric must be one of {sorted(DEFAULT_SCALE)}, got {metric!r}")
    if queries.ndim != 2 or prototypes.ndim != 2 or queries.shape[1] != prototypes.shape[1]:
        raise ValueError(f"prototype_logits expects (M, D) queries and (C, D) prototypes of equal D, got "
                         f"{tuple(queries.shape)} and {tuple(prototypes.shape)}")
    scale = DEFAULT_SCALE[metric] if scale is None else scale
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if metric == "cosine":
        return scale * F.normalize(queries, dim=1) @ F.normalize(prototypes, dim=1).T
    # |q - p|^2 expanded: (M, C) memory instead of the (M, C, D) of an explicit difference; the clamp
    # removes the tiny negative values rounding can leave where a query sits on a prototype.
    squared = (queries.pow(2).sum(1, keepdim=True) - 2.0 * queries @ prototypes.T
               + prototypes.pow(2).sum(1)).clamp_min(0.0)
    return -scale * squared


class PrototypicalClassifier(ClassifierMixin, BaseEstimator):
    """Nearest-prototype classifier on fixed embeddings, with scikit-learn's interface.

    Fitting computes one prototype per class (its mean embedding); prediction is the softmax over
    :func:`prototype_logits`. It has no other parameter to learn, so it is usable with as few as one
    labeled example per class.

    Args:
        metric: ``"euclidean"`` (the paper) or ``"cosine"``.
        scale: multiplies the logits before the softmax; default ``DEFAULT_SCALE[metric]``. It changes
            :meth:`predict_proba`'s confidence, never :meth:`predict`.

    Attributes:
        classes_: (C,) the sorted class labels seen by :meth:`fit` (any sortable values).
        prototypes_: (C, D) float64 prototypes, row ``c`` for ``classes_[c]``.
        n_features_in_: D.

    Examples:
        >>> support = embeddings(backbone, support_loader)  # medtl.train.inference.embeddings: (N, D)
        >>> clf = PrototypicalClassifier().fit(support, support_labels)
        >>> clf.predict(embeddings(backbone, query_loader))
    """

    def __init__(self, metric: Metric = "euclidean", scale: float | None = None) -> None:
        self.metric = metric
        self.scale = scale

    def fit(self, X: np.ndarray, y: np.ndarray) -> PrototypicalClassifier:
        """Compute the class prototypes.

        Args:
            X: (N, D) embeddings of the labeled examples.
            y: (N,) their labels; at least two classes.

        Returns:
            self.
        """
        features, labels = check_X_y(X, y, dtype=np.float64)
        check_classification_targets(labels)
        self.classes_, encoded = np.unique(labels, return_inverse=True)
        if self.classes_.size < 2:
            raise ValueError(f"PrototypicalClassifier needs at least 2 classes; got 1 class ({self.classes_[0]!r})")
        self.prototypes_ = prototypes(torch.tensor(features), torch.tensor(encoded), self.classes_.size).numpy()
        self.n_features_in_ = features.shape[1]
        return self

    def _logits(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        features = check_array(X, dtype=np.float64)
        if features.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {features.shape[1]} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input; embed with the backbone used in fit")
        return prototype_logits(torch.tensor(features), torch.from_numpy(self.prototypes_), self.metric,
                                self.scale).numpy()

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Prototype logits, as scikit-learn shapes decision functions.

        Args:
            X: (M, D) embeddings.

        Returns:
            (M, C) logits; for two classes, (M,) the margin of ``classes_[1]`` over ``classes_[0]``
            (positive means ``classes_[1]``), so ``roc_auc_score(y, clf.decision_function(X))`` works.
        """
        logits = self._logits(X)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(M, D) embeddings → (M, C) class probabilities, columns in ``classes_`` order."""
        return torch.softmax(torch.from_numpy(self._logits(X)), dim=1).numpy()

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(M, D) embeddings → (M,) labels of the nearest prototypes."""
        logits = self._logits(X)  # first: it raises NotFittedError before classes_ is read
        return self.classes_[logits.argmax(1)]


class EpisodeSampler(Sampler[list[int]]):
    """Batches of dataset indices that are N-way K-shot episodes, one episode per batch.

    Each episode draws ``n_way`` distinct classes, then ``k_shot + n_query`` distinct examples of each,
    all without replacement. The indices come in this order (what :class:`PrototypicalLoss` expects):
    first the support set, ``k_shot`` examples of the first drawn class, then ``k_shot`` of the second,
    …; then the queries, ``n_query`` of the first class, ``n_query`` of the second, …. The class order
    within an episode is random, so the episode-relative class index of a class changes between episodes.

    Episodes depend only on ``seed`` and the epoch: call :meth:`set_epoch` at the start of every epoch (as
    for torch's ``DistributedSampler``) for new episodes that a resumed run reproduces exactly.

    Args:
        labels: (L,) integer class of every dataset item, e.g. ``[r["label"] for r in records]``;
            items labeled below 0 (medtl's unlabeled, -1) are never drawn.
        n_way: classes per episode (N >= 2).
        k_shot: support examples per class (K >= 1).
        n_query: query examples per class (Q >= 1).
        episodes_per_epoch: batches per pass; the loader's ``len()``.
        seed: with the epoch, fixes every episode.

    Examples:
        >>> sampler = EpisodeSampler([r["label"] for r in records], n_way=3, k_shot=5, n_query=5)
        >>> loader = DataLoader(SampleDataset(records, transform), batch_sampler=sampler)
        >>> batch = next(iter(loader))  # batch["image"]: (3 * (5 + 5), C, *S)
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, n_way: int, k_shot: int, n_query: int,
                 episodes_per_epoch: int = 100, seed: int = 0) -> None:
        super().__init__()
        for name, value, least in (("n_way", n_way, 2), ("k_shot", k_shot, 1), ("n_query", n_query, 1),
                                   ("episodes_per_epoch", episodes_per_epoch, 1)):
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-D sequence of integer classes, got dtype {labels.dtype} and "
                             f"shape {labels.shape}; encode class names as integers first")
        classes = np.unique(labels[labels >= 0])
        if classes.size < n_way:
            raise ValueError(f"an episode needs n_way={n_way} classes but the labels hold {classes.size} "
                             f"({classes.tolist()}); lower n_way or label more classes")
        per_episode = k_shot + n_query
        self.class_indices = [np.flatnonzero(labels == c) for c in classes]
        too_small = {int(c): idx.size for c, idx in zip(classes, self.class_indices) if idx.size < per_episode}
        if too_small:
            listed = ", ".join(f"class {c} has {n}" for c, n in too_small.items())
            raise ValueError(f"every class needs k_shot + n_query = {k_shot} + {n_query} = {per_episode} examples "
                             f"for an episode, but {listed}; lower k_shot or n_query, or leave those classes "
                             "out of the labels (label them -1)")
        self.n_way = n_way
        self.k_shot = k_shot
        self.n_query = n_query
        self.episodes_per_epoch = episodes_per_epoch
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose episodes the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.episodes_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        # (seed, epoch) as separate entropy words: seed 1 epoch 0 and seed 0 epoch 1 differ.
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(self.episodes_per_epoch):
            chosen = rng.choice(len(self.class_indices), self.n_way, replace=False)
            drawn = [rng.choice(self.class_indices[c], self.k_shot + self.n_query, replace=False) for c in chosen]
            support = [int(i) for d in drawn for i in d[:self.k_shot]]
            queries = [int(i) for d in drawn for i in d[self.k_shot:]]
            yield support + queries


class PrototypicalLoss(Objective):
    """Episodic training of a backbone for prototypical classification (Snell et al. 2017, algorithm 1).

    A batch is one episode in :class:`EpisodeSampler`'s order. The support embeddings give one
    prototype per class and the loss is the cross-entropy of the queries against the prototypes, with
    the classes indexed within the episode (0 … n_way-1, in drawing order). The model must provide
    ``embed(x) -> (B, D)``; the objective has no parameters of its own.

    Args:
        n_way: classes per episode, as given to the sampler.
        k_shot: support examples per class, as given to the sampler.
        n_query: query examples per class, as given to the sampler.
        metric: ``"euclidean"`` (the paper) or ``"cosine"``.
        scale: logit scale; default ``DEFAULT_SCALE[metric]``.

    Logs ``loss`` and ``acc``, the fraction of the episode's queries classified correctly.

    Examples:
        >>> sampler = EpisodeSampler(labels, n_way=3, k_shot=5, n_query=5, episodes_per_epoch=50)
        >>> loader = DataLoader(dataset, batch_sampler=sampler)
        >>> fit(backbone, PrototypicalLoss(n_way=3, k_shot=5, n_query=5), loader, cfg)
    """

    def __init__(self, n_way: int, k_shot: int, n_query: int, metric: Metric = "euclidean",
                 scale: float | None = None) -> None:
        super().__init__()
        for name, value, least in (("n_way", n_way, 2), ("k_shot", k_shot, 1), ("n_query", n_query, 1)):
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        if metric not in DEFAULT_SCALE:
            raise ValueError(f"metric must be one of {sorted(DEFAULT_SCALE)}, got {metric!r}")
        if scale is not None and scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.n_way = n_way
        self.k_shot = k_shot
        self.n_query = n_query
        self.metric = metric
        self.scale = scale

    def forward(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        x, y = batch["image"], batch["label"]
        n_support = self.n_way * self.k_shot
        if x.shape[0] != n_support + self.n_way * self.n_query:
            raise ValueError(f"an episode of n_way={self.n_way}, k_shot={self.k_shot}, n_query={self.n_query} has "
                             f"{n_support + self.n_way * self.n_query} images, the batch has {x.shape[0]}; give "
                             "the EpisodeSampler and PrototypicalLoss the same n_way / k_shot / n_query")
        self._check_episode_order(y)
        z = model.embed(x).float()
        episode_classes = torch.arange(self.n_way, device=z.device)
        support_labels = episode_classes.repeat_interleave(self.k_shot)
        query_labels = episode_classes.repeat_interleave(self.n_query)
        # fit() runs objectives under bf16 autocast on GPU, which would run these matrix products in bf16; the
        # expanded squared distance |q|^2 - 2 q.p + |p|^2 cancels catastrophically at bf16's 8-bit mantissa.
        with torch.autocast(z.device.type, enabled=False):
            logits = prototype_logits(z[n_support:], prototypes(z[:n_support], support_labels, self.n_way),
                                      self.metric, self.scale)
        loss = F.cross_entropy(logits, query_labels)
        acc = (logits.argmax(1) == query_labels).float().mean()
        return loss, {"loss": loss.item(), "acc": acc.item()}

    def _check_episode_order(self, labels: Tensor) -> None:
        """Reject batches that are not episodes: a shuffled batch would otherwise train against wrong
        episode-relative labels without any error."""
        n_support = self.n_way * self.k_shot
        support = labels[:n_support].reshape(self.n_way, self.k_shot)
        queries = labels[n_support:].reshape(self.n_way, self.n_query)
        first = support[:, :1]
        in_order = (support == first).all() & (queries == first).all() & (first.unique().numel() == self.n_way)
        if not bool(in_order):
            raise ValueError("the batch is not an episode in EpisodeSampler order (support then queries, grouped "
                             "by class); build the loader as DataLoader(dataset, batch_sampler=EpisodeSampler(...))")


def evaluate_episodes(embeddings: np.ndarray, labels: np.ndarray, n_way: int, k_shot: int, n_query: int,
                      episodes: int = 600, seed: int = 0, metric: Metric = "euclidean") -> dict[str, float]:
    """Few-shot accuracy of prototypical classification on fixed embeddings: the standard protocol.

    Draws ``episodes`` random N-way K-shot episodes (as :class:`EpisodeSampler` does), classifies each
    episode's queries with a :class:`PrototypicalClassifier` fitted on its support set, and reports the
    mean accuracy with a 95 % normal confidence interval ``mean ± 1.96 · std / sqrt(episodes)``
    (``std`` the sample standard deviation of the per-episode accuracies), as in Snell et al. 2017 and
    later few-shot work (usually 600 episodes).

    Args:
        embeddings: (L, D) embeddings, e.g. from :func:`medtl.train.inference.embeddings`.
        labels: (L,) integer classes; below 0 means unlabeled and is never drawn.
        n_way: classes per episode.
        k_shot: support examples per class.
        n_query: query examples per class.
        episodes: episodes to average (>= 2).
        seed: fixes the episodes.
        metric: ``"euclidean"`` or ``"cosine"``.

    Returns:
        ``{"accuracy", "ci95" (the half-width), "ci_low", "ci_high", "episodes"}``; the bounds are the normal
        approximation's, not clipped to [0, 1].

    Examples:
        >>> evaluate_episodes(embeddings(backbone, loader), labels, n_way=2, k_shot=5, n_query=15)
        {'accuracy': 0.83, 'ci95': 0.012, 'ci_low': 0.818, 'ci_high': 0.842, 'episodes': 600}
    """
    if episodes < 2:
        raise ValueError(f"episodes must be >= 2 for a confidence interval, got {episodes}")
    features, labels = check_X_y(embeddings, labels, dtype=np.float64)
    sampler = EpisodeSampler(labels, n_way, k_shot, n_query, episodes_per_epoch=episodes, seed=seed)
    n_support = n_way * k_shot
    accuracies = []
    for episode in sampler:
        support, queries = episode[:n_support], episode[n_support:]
        classifier = PrototypicalClassifier(metric=metric).fit(features[support], labels[support])
        accuracies.append(float(np.mean(classifier.predict(features[queries]) == labels[queries])))
    mean = float(np.mean(accuracies))
    half_width = float(1.96 * np.std(accuracies, ddof=1) / np.sqrt(episodes))
    return {"accuracy": mean, "ci95": half_width, "ci_low": mean - half_width, "ci_high": mean + half_width,
            "episodes": episodes}
