"""Label (prior) shift: a target hospital's class prevalence from its unlabeled images, and the prior correction.

Under label shift the class-conditional image distributions are the same at both hospitals, ``p_t(x|y) = p_s(x|y)``,
and only the class prevalence differs, ``π_t(y) ≠ π_s(y)`` (a screening site vs a referral hospital). The
source-trained model's posterior is then wrong on the target by a known factor, and the target prior can be
estimated without target labels:

* :func:`prior_corrected`: the posterior under a new prior, ``p_t(y|x) ∝ p_s(y|x) · π_t(y) / π_s(y)`` (Saerens,
  Latinne & Decaestecker, "Adjusting the Outputs of a Classifier to New a Priori Probabilities: A Simple
  Procedure", Neural Computation 2002).
* :func:`em_prior`: the maximum-likelihood target prior by EM (Saerens et al. 2002). It trusts the probabilities, so
  they must be calibrated: Alexandari, Kundaje & Shrikumar ("Maximum Likelihood with Bias-Corrected Calibration is
  Hard-To-Beat at Label Shift Adaptation", ICML 2020) show that EM after bias-corrected temperature scaling (BCTS,
  :class:`~medtl.evaluate.calibration.TemperatureScaling` with ``bias=True``) matches or beats the alternatives.
* :func:`bbse_prior`: black-box shift estimation (Lipton, Wang & Smola, "Detecting and Correcting for Label Shift
  with Black Box Predictors", ICML 2018), which needs only the model's hard predictions and an invertible
  confusion matrix on the labeled source validation split, and no calibration.

:class:`LabelShiftEstimator` fits one of them, with a (patient-level) bootstrap interval, and corrects new target
probabilities.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from medtl.evaluate.calibration import TemperatureScaling, check_probabilities, check_labels

log = logging.getLogger("medtl.adapt")

LABEL_SHIFT_METHODS = ("bbse", "em")
"""Target-prior estimators of :class:`LabelShiftEstimator` (a config adds ``none``: no correction)."""


def prior_corrected(probabilities: np.ndarray, source_prior: np.ndarray, target_prior: np.ndarray) -> np.ndarray:
    """Posteriors under the target prior: ``p_t(y|x) ∝ p_s(y|x) · π_t(y) / π_s(y)``, renormalised per row.

    Exact under label shift when ``probabilities`` are the calibrated source posteriors and ``source_prior`` the
    prior they were calibrated under (Saerens et al., Neural Computation 2002, eq. 2.4). A row whose every class
    with non-zero probability has ``π_t = 0`` carries no information under the new prior and becomes ``π_t``.

    Args:
        probabilities: (N, C) source-model posteriors, rows summing to 1.
        source_prior: (C,) π_s, every entry > 0, summing to 1.
        target_prior: (C,) π_t, entries >= 0, summing to 1.

    Returns:
        (N, C) corrected posteriors, rows summing to 1.

    Examples:
        >>> p = np.array([[0.5, 0.5], [0.8, 0.2]])
        >>> prior_corrected(p, np.array([0.5, 0.5]), np.array([0.8, 0.2]))  # odds x (0.2/0.8) / (0.5/0.5)
        array([[0.8       , 0.2       ],
               [0.94117647, 0.05882353]])
    """
    p = check_probabilities(probabilities, "probabilities")
    pi_s = _check_prior(source_prior, "source_prior", p.shape[1], positive=True)
    pi_t = _check_prior(target_prior, "target_prior", p.shape[1], positive=False)
    return _prior_corrected(p, pi_t / pi_s, pi_t)


def em_prior(target_probabilities: np.ndarray, source_prior: np.ndarray, max_iter: int = 1000,
             tol: float = 1e-8) -> np.ndarray:
    """Maximum-likelihood target prior by EM (Saerens, Latinne & Decaestecker, Neural Computation 2002).

    Starting at ``π = π_s``, the E-step corrects the target posteriors to the current prior
    (:func:`prior_corrected`) and the M-step sets ``π`` to their mean, until no entry moves by more than ``tol``.
    Each step increases the likelihood of the unlabeled target images under the mixture ``Σ_y π(y) p_s(x|y)``, which
    is concave in π, so EM converges to the maximum-likelihood prior, provided the probabilities are calibrated
    (fit :class:`~medtl.evaluate.calibration.TemperatureScaling` with ``bias=True`` on the source first; Alexandari
    et al., ICML 2020).

    Args:
        target_probabilities: (N_t, C) the source model's (calibrated) posteriors on the unlabeled target images.
        source_prior: (C,) π_s, the class frequencies the posteriors were calibrated under, every entry > 0.
        max_iter: EM iterations at most; a RuntimeWarning says when they ran out.
        tol: convergence threshold on the largest change of a prior entry.

    Returns:
        (C,) the estimated target prior, summing to 1.

    Examples:
        >>> p = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9]])  # two images look like class 0, one like class 1
        >>> em_prior(p, np.array([0.5, 0.5])).round(3)  # the MLE: further from π_s than the mean posterior 0.633
        array([0.708, 0.292])
    """
    p = check_probabilities(target_probabilities, "target_probabilities")
    pi_s = _check_prior(source_prior, "source_prior", p.shape[1], positive=True)
    if int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    prior, converged = _em_prior(p, pi_s, int(max_iter), float(tol))
    if not converged:
        warnings.warn(f"em_prior did not converge in {max_iter} iterations (tol {tol}); raise max_iter",
                      RuntimeWarning, stacklevel=2)
    return prior


def bbse_prior(source_probabilities: np.ndarray, source_labels: np.ndarray, target_probabilities: np.ndarray,
               soft: bool = False) -> np.ndarray:
    """Target prior by black-box shift estimation, BBSE (Lipton, Wang & Smola, ICML 2018).

    On the labeled source validation split, the joint confusion matrix ``C[i, j] = P_s(ŷ = i, y = j)``; on the
    target, the prediction rates ``μ_t[i] = P_t(ŷ = i)``. Under label shift ``μ_t = C w`` with importance weights
    ``w(y) = π_t(y) / π_s(y)``, so ``w = C⁻¹ μ_t`` (a least-squares solve), clipped at 0, and the target prior is
    ``w · π_s`` renormalised. It needs no calibration, only a classifier whose confusion matrix is invertible.

    Args:
        source_probabilities: (N_s, C) the model's posteriors on the labeled source validation images.
        source_labels: (N_s,) their classes in [0, C); every class must be present.
        target_probabilities: (N_t, C) its posteriors on the unlabeled target images.
        soft: False for hard predictions ŷ = argmax (the paper's BBSE-hard); True to use the probabilities in
            place of one-hot predictions (BBSE-soft).

    Returns:
        (C,) the estimated target prior, summing to 1.

    Raises:
        ValueError: on bad inputs, a class absent from ``source_labels``, or a singular (rank-deficient)
            confusion matrix, e.g. when the model predicts one class for every source image.

    Examples:
        >>> source = np.array([[0.8, 0.2], [0.7, 0.3], [0.4, 0.6], [0.3, 0.7]])
        >>> labels = np.array([0, 0, 1, 0])  # the model calls one class-0 image class 1
        >>> target = np.array([[0.2, 0.8], [0.1, 0.9], [0.6, 0.4], [0.3, 0.7]])  # 3 of 4 predicted class 1
        >>> bbse_prior(source, labels, target)  # w = C⁻¹ μ_t = [0.5, 2.5], times π_s = [0.75, 0.25]
        array([0.375, 0.625])
    """
    ps = check_probabilities(source_probabilities, "source_probabilities")
    pt = check_probabilities(target_probabilities, "target_probabilities")
    if pt.shape[1] != ps.shape[1]:
        raise ValueError(f"source_probabilities have {ps.shape[1]} classes and target_probabilities {pt.shape[1]}: "
                         "give the same model's outputs on both")
    ys = check_labels(source_labels, len(ps), ps.shape[1], "source_labels")
    source_prior = _label_frequencies(ys, ps.shape[1])
    _check_every_class_labeled(source_prior)
    prior = _bbse_prior(ps, ys, pt, source_prior, bool(soft))
    if prior is None:
        raise ValueError(_SINGULAR_CONFUSION)
    return prior


class LabelShiftEstimator(BaseEstimator):
    """Estimate a target hospital's class prior from its unlabeled images, with a bootstrap interval, and correct
    the model's probabilities to it.

    ``fit`` takes the model's probabilities on the labeled *source validation split* (with its labels) and on the
    unlabeled *target* images. π_s is the source split's label frequency. With ``method="em"`` and ``calibrate``,
    BCTS (:class:`~medtl.evaluate.calibration.TemperatureScaling`, ``bias=True``; Alexandari et al., ICML 2020) is
    first fitted on the source split and applied to both sets, since EM (Saerens et al., Neural Computation 2002)
    is only as good as the calibration of the probabilities; ``method="bbse"`` (Lipton et al., ICML 2018) needs no
    calibration and gets none. The percentile bootstrap resamples the target images and the source split with
    replacement, by patient when groups are given (a drawn patient brings all their images), and refits the
    calibration and the estimate on each replicate.

    Args:
        method: one of ``LABEL_SHIFT_METHODS``: ``"em"`` (maximum likelihood) or ``"bbse"``.
        calibrate: fit BCTS before EM (ignored for BBSE).
        n_bootstrap: bootstrap replicates; 0 = point estimate only (the intervals are NaN).
        confidence: two-sided level of the percentile interval, in (0.5, 1).
        seed: seed of the bootstrap's random generator.

    Attributes:
        source_prior_: (C,) π_s, the source split's label frequencies.
        target_prior_: (C,) the estimated π_t.
        ci_low_, ci_high_: (C,) percentile bootstrap interval of π_t at ``confidence`` (NaN without replicates).
        weights_: (C,) ``target_prior_ / source_prior_``, the class importance weights.
        calibration_: the fitted TemperatureScaling, or None (BBSE, or ``calibrate=False``).
        n_source_, n_target_: images in the source split and the target.
        n_bootstrap_effective_: replicates that gave an estimate (one whose resample lacks a labeled class, or
            whose BBSE confusion matrix is singular, is skipped).

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> def simulate(n, prevalence):  # scores N(±1, 1); the model is exact for a source prevalence of 0.5
        ...     y = (rng.uniform(size=n) < prevalence).astype(int)
        ...     return 1 / (1 + np.exp(-2 * (2 * y - 1 + rng.normal(size=n)))), y
        >>> source_p, source_y = simulate(2000, 0.5)
        >>> target_p, _ = simulate(2000, 0.2)  # a screening site: 20 % prevalence
        >>> shift = LabelShiftEstimator(n_bootstrap=100).fit(source_p, source_y, target_p)
        >>> bool(abs(shift.target_prior_[1] - 0.2) < 0.03), bool(shift.ci_low_[1] < 0.2 < shift.ci_high_[1])
        (True, True)
        >>> shift.transform(target_p).shape  # corrected P(class 1) of the target images
        (2000,)
    """

    def __init__(self, method: str = "em", calibrate: bool = True, n_bootstrap: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> None:
        self.method = method
        self.calibrate = calibrate
        self.n_bootstrap = n_bootstrap
        self.confidence = confidence
        self.seed = seed
        self._check_params()

    def fit(self, source_probabilities: np.ndarray, source_labels: np.ndarray, target_probabilities: np.ndarray, *,
            source_groups: np.ndarray | None = None, target_groups: np.ndarray | None = None) -> "LabelShiftEstimator":
        """Estimate the target prior and its bootstrap interval.

        Args:
            source_probabilities: (N_s, C) the model's probabilities on the labeled source validation images, or
                (N_s,) P(class 1) of a binary model.
            source_labels: (N_s,) their classes in [0, C); every class must be present.
            target_probabilities: (N_t, C) or (N_t,) its probabilities on the unlabeled target images.
            source_groups: (N_s,) patient ids of the source images, or None (each image its own patient).
            target_groups: (N_t,) patient ids of the target images, or None.

        Returns:
            self, fitted.

        Raises:
            ValueError: on bad inputs, a class without labeled source images, or (BBSE) a singular confusion matrix
                on the source split.
        """
        self._check_params()
        ps = check_probabilities(source_probabilities, "source_probabilities")
        pt = check_probabilities(target_probabilities, "target_probabilities")
        if pt.shape[1] != ps.shape[1]:
            raise ValueError(f"source_probabilities have {ps.shape[1]} classes and target_probabilities "
                             f"{pt.shape[1]}: give the same model's outputs on both")
        n_classes = ps.shape[1]
        ys = check_labels(source_labels, len(ps), n_classes, "source_labels")
        source_sampler = _GroupSampler(source_groups, len(ps), "source_groups")
        target_sampler = _GroupSampler(target_groups, len(pt), "target_groups")
        source_prior = _label_frequencies(ys, n_classes)
        _check_every_class_labeled(source_prior)

        calibrated = self.method == "em" and bool(self.calibrate)
        if self.calibrate and not calibrated:
            log.info("label shift: BBSE needs no calibration; calibrate=True is ignored for it")
        calibration = TemperatureScaling(bias=True).fit(ps, ys) if calibrated else None
        target_prior = self._estimate(ps, ys, pt, source_prior, calibration, warm_start=None)
        if target_prior is None:
            raise ValueError(_SINGULAR_CONFUSION)

        rng = np.random.default_rng(self.seed)
        replicates = []
        for _ in range(int(self.n_bootstrap)):
            source_rows, target_rows = source_sampler.draw(rng), target_sampler.draw(rng)
            ys_b = ys[source_rows]
            prior_b = _label_frequencies(ys_b, n_classes)
            if (prior_b == 0).any():  # a class without labeled images in this resample: π_s undefined
                continue
            calibration_b = TemperatureScaling(bias=True) if calibrated else None
            estimate = self._estimate(ps[source_rows], ys_b, pt[target_rows], prior_b, calibration_b,
                                      warm_start=calibration)
            if estimate is not None:
                replicates.append(estimate)
        if replicates:
            alpha = 1.0 - self.confidence
            ci_low, ci_high = np.percentile(np.stack(replicates), [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
        else:
            ci_low = ci_high = np.full(n_classes, np.nan)
        if len(replicates) < self.n_bootstrap:
            log.warning("label shift: %d of %d bootstrap replicates gave no estimate (a class without labeled source "
                        "images, or a singular BBSE confusion matrix, in the resample) and were skipped",
                        int(self.n_bootstrap) - len(replicates), int(self.n_bootstrap))

        self.source_prior_ = source_prior
        self.target_prior_ = target_prior
        self.ci_low_ = np.asarray(ci_low, dtype=np.float64)
        self.ci_high_ = np.asarray(ci_high, dtype=np.float64)
        self.weights_ = target_prior / source_prior
        self.calibration_ = calibration
        self.n_source_ = len(ps)
        self.n_target_ = len(pt)
        self.n_bootstrap_effective_ = len(replicates)
        log.info("label shift (%s%s): source prior %s -> target prior %s", self.method,
                 " + BCTS" if calibrated else "", np.round(source_prior, 3).tolist(),
                 np.round(target_prior, 3).tolist())
        return self

    def transform(self, probabilities: np.ndarray) -> np.ndarray:
        """The model's probabilities on target images, corrected to the estimated target prior.

        The same calibration as the estimate (``calibration_``, when set) comes first, then
        :func:`prior_corrected` from ``source_prior_`` to ``target_prior_``.

        Args:
            probabilities: (N, C) the model's probabilities, or (N,) P(class 1) of a binary model.

        Returns:
            The corrected probabilities, of the input's shape.
        """
        check_is_fitted(self, "target_prior_")
        one_dimensional = np.ndim(probabilities) == 1
        p = check_probabilities(probabilities, "probabilities")
        if p.shape[1] != len(self.source_prior_):
            raise ValueError(f"probabilities have {p.shape[1]} classes but the estimator was fitted on "
                             f"{len(self.source_prior_)}: transform the outputs of the same model")
        if self.calibration_ is not None:
            p = self.calibration_.transform(p)
        corrected = _prior_corrected(p, self.weights_, self.target_prior_)
        return corrected[:, 1] if one_dimensional else corrected

    def summary(self) -> dict:
        """The fit as JSON-ready values (lists of floats, NaN as None).

        Returns:
            ``{"method", "calibrated", "source_prior", "target_prior", "ci_low", "ci_high", "confidence", "n_source",
            "n_target", "n_bootstrap"}``, where ``n_bootstrap`` counts the replicates the interval rests on
            (``n_bootstrap_effective_``).
        """
        check_is_fitted(self, "target_prior_")

        def floats(values: np.ndarray) -> list[float | None]:
            return [float(v) if np.isfinite(v) else None for v in values]

        return {"method": self.method, "calibrated": self.calibration_ is not None,
                "source_prior": floats(self.source_prior_), "target_prior": floats(self.target_prior_),
                "ci_low": floats(self.ci_low_), "ci_high": floats(self.ci_high_),
                "confidence": float(self.confidence), "n_source": int(self.n_source_),
                "n_target": int(self.n_target_), "n_bootstrap": int(self.n_bootstrap_effective_)}

    def _estimate(self, ps: np.ndarray, ys: np.ndarray, pt: np.ndarray, source_prior: np.ndarray,
                  calibration: TemperatureScaling | None, warm_start: TemperatureScaling | None) -> np.ndarray | None:
        """π_t from checked arrays, fitting ``calibration`` (unfitted) first when given; None when BBSE's confusion
        matrix is singular."""
        if self.method == "bbse":
            return _bbse_prior(ps, ys, pt, source_prior, soft=False)
        if calibration is not None:
            if warm_start is None:
                calibration.fit(ps, ys)
            else:  # bootstrap refits start at the full-data fit: a few L-BFGS-B steps instead of a cold start
                calibration.fit(ps, ys, temperature_init=warm_start.temperature_, bias_init=warm_start.bias_)
            pt = calibration.transform(pt)
        prior, converged = _em_prior(pt, source_prior, max_iter=1000, tol=1e-8)
        if not converged:
            log.debug("label shift: EM stopped at 1000 iterations before converging")
        return prior

    def _check_params(self) -> None:
        if self.method not in LABEL_SHIFT_METHODS:
            raise ValueError(f"method must be one of {LABEL_SHIFT_METHODS} (em: maximum likelihood, after BCTS "
                             f"calibration; bbse: black-box shift estimation), got {self.method!r}")
        if not isinstance(self.calibrate, (bool, np.bool_)):
            raise ValueError(f"calibrate must be True or False, got {self.calibrate!r}")
        if not isinstance(self.n_bootstrap, (int, np.integer)) or isinstance(self.n_bootstrap, bool) \
                or self.n_bootstrap < 0:
            raise ValueError(f"n_bootstrap must be an integer >= 0 (0 = no interval; 1000 is usual), got "
                             f"{self.n_bootstrap!r}")
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0.5, 1), e.g. 0.95, got {self.confidence!r}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")


_SINGULAR_CONFUSION = ("BBSE's confusion matrix on the source validation split is singular (rank-deficient), e.g. "
                       "because the model predicts one class for every source image: BBSE needs a classifier whose "
                       "confusion matrix is invertible. Use method 'em' (with calibration) instead, or a better "
                       "classifier")


class _GroupSampler:
    """Bootstrap row indices that draw patients (groups) with replacement and keep all of a drawn patient's rows."""

    def __init__(self, groups: np.ndarray | None, n: int, name: str) -> None:
        self.n = n
        if groups is None:
            self.codes = None
            return
        g = np.asarray(groups)
        if g.shape != (n,):
            raise ValueError(f"{name} must hold one patient id per image ({n}), got shape {g.shape}")
        try:
            _, codes = np.unique(g, return_inverse=True)
        except TypeError as exc:
            raise ValueError(f"{name} must hold comparable patient ids of one type (no None), got {exc}") from exc
        if g.dtype.kind == "f" and not np.isfinite(g).all():
            raise ValueError(f"{name} contains NaN patient ids; every image needs one")
        self.codes = codes.reshape(-1)
        self.rows_by_group = np.argsort(self.codes, kind="stable")
        self.sizes = np.bincount(self.codes)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        if self.codes is None:
            return rng.integers(0, self.n, size=self.n)
        drawn = rng.integers(0, len(self.sizes), size=len(self.sizes))
        sizes = self.sizes[drawn]
        # position k of drawn group d is rows_by_group[starts[d] + k]: one vectorised gather for all drawn groups
        within = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        return self.rows_by_group[np.repeat(self.starts[drawn], sizes) + within]


def _prior_corrected(p: np.ndarray, weights: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    corrected = p * weights
    total = corrected.sum(axis=1, keepdims=True)
    empty = total[:, 0] <= 0
    if empty.any():
        corrected[empty], total[empty] = fallback, 1.0
    return corrected / total


def _em_prior(p: np.ndarray, source_prior: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, bool]:
    prior = source_prior.copy()
    for _ in range(max_iter):
        updated = _prior_corrected(p, prior / source_prior, prior).mean(axis=0)
        if np.abs(updated - prior).max() < tol:
            return updated, True
        prior = updated
    return prior, False


def _bbse_prior(ps: np.ndarray, ys: np.ndarray, pt: np.ndarray, source_prior: np.ndarray,
                soft: bool) -> np.ndarray | None:
    """BBSE from checked arrays; None when the confusion matrix is rank-deficient."""
    n_classes = ps.shape[1]
    if soft:
        predicted_source, target_rates = ps, pt.mean(axis=0)
    else:
        predicted_source = np.eye(n_classes)[ps.argmax(axis=1)]
        target_rates = np.bincount(pt.argmax(axis=1), minlength=n_classes) / len(pt)
    confusion = predicted_source.T @ np.eye(n_classes)[ys] / len(ys)  # C[i, j] = P_s(ŷ = i, y = j)
    weights, _, rank, _ = np.linalg.lstsq(confusion, target_rates, rcond=None)
    if rank < n_classes:
        return None
    prior = np.clip(weights, 0.0, None) * source_prior
    return prior / prior.sum()


def _label_frequencies(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=n_classes) / len(labels)


def _check_every_class_labeled(source_prior: np.ndarray) -> None:
    missing = np.flatnonzero(source_prior == 0)
    if len(missing):
        raise ValueError(f"source_labels have no image of class(es) {missing.tolist()}: the source prior and the "
                         "correction need labeled source validation images of every class")


def _check_prior(prior: np.ndarray, name: str, n_classes: int, positive: bool) -> np.ndarray:
    pi = np.asarray(prior, dtype=np.float64)
    if pi.shape != (n_classes,):
        raise ValueError(f"{name} must be (C,) = ({n_classes},), one probability per class, got shape {pi.shape}")
    if not np.isfinite(pi).all() or (pi < 0).any() or not abs(pi.sum() - 1) < 1e-6:
        raise ValueError(f"{name} must be class frequencies (non-negative, summing to 1), got {pi.tolist()}")
    if positive and (pi <= 0).any():
        raise ValueError(f"{name} must be > 0 for every class (it divides the posteriors), got {pi.tolist()}")
    return pi
