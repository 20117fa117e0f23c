"""Post-hoc calibration of a classifier's probabilities, fitted on the labeled source validation split.

A network's softmax outputs are often over-confident; post-hoc calibration rescales its logits with a few
parameters fitted by maximum likelihood on held-out labeled data, which leaves the ranking of the classes (hence
accuracy and, for one temperature, AUC) unchanged:

* temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017): ``softmax(z / T)``;
* bias-corrected temperature scaling, BCTS (Alexandari, Kundaje & Shrikumar, "Maximum Likelihood with
  Bias-Corrected Calibration is Hard-To-Beat at Label Shift Adaptation", ICML 2020): ``softmax(z / T + b)``, one
  bias per class. At its optimum the mean calibrated probability of each class equals that class's frequency in
  the fitting data, which is what the EM prior estimate of :mod:`medtl.adapt.label_shift` needs.

The model's logits are not needed: ``log p`` differs from them by a per-row constant, to which the softmax is
invariant, so the calibrators take probabilities. :func:`as_two_class` turns a binary model's P(class 1) into the
(N, 2) matrix the rest of the code works with.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

PROBABILITY_FLOOR = 1e-12
"""Probabilities are clipped to [PROBABILITY_FLOOR, 1] before the log, so that a probability of 0 gives a finite
logit (about -27.6) instead of -inf."""
_LOG_TEMPERATURE_BOUNDS = (np.log(1e-3), np.log(1e3))  # T in [0.001, 1000]: bounded when the data are separable
_BIAS_BOUNDS = (-50.0, 50.0)  # beyond the logit range set by the floor: bounded when a class is absent


def as_two_class(p: np.ndarray) -> np.ndarray:
    """The (N, 2) class-probability matrix ``[1 - p, p]`` of a binary model's P(class 1).

    Args:
        p: (N,) probabilities of class 1, in [0, 1].

    Returns:
        (N, 2) float64 array whose rows sum to 1; column 1 is ``p``.

    Examples:
        >>> as_two_class(np.array([0.2, 1.0]))
        array([[0.8, 0.2],
               [0. , 1. ]])
    """
    q = np.asarray(p, dtype=np.float64)
    if q.ndim != 1:
        raise ValueError(f"p must be a 1-D array of P(class 1), got shape {q.shape}; an (N, C) array already has "
                         "one column per class")
    if not np.isfinite(q).all() or (q < 0).any() or (q > 1).any():
        raise ValueError("p must hold probabilities in [0, 1] (no NaN or inf): apply a sigmoid to the model's logit")
    return np.column_stack([1.0 - q, q])


def temperature_scale(probabilities: np.ndarray, temperature: float, bias: np.ndarray | None = None) -> np.ndarray:
    """``softmax(log p / T + b)`` row by row: probabilities rescaled by a temperature and per-class biases.

    Args:
        probabilities: (N, C) class probabilities, rows summing to 1.
        temperature: T > 0; T > 1 softens over-confident probabilities, T < 1 sharpens them.
        bias: (C,) logit offsets b, or None for zeros.

    Returns:
        (N, C) calibrated probabilities, rows summing to 1.

    Examples:
        >>> p = np.array([[0.1, 0.9]])
        >>> temperature_scale(p, 1.0).round(6)  # T = 1, no bias: unchanged
        array([[0.1, 0.9]])
        >>> temperature_scale(p, 2.0).round(3)  # odds 9 -> sqrt(9) = 3: p = 0.75
        array([[0.25, 0.75]])
    """
    p = check_probabilities(probabilities, "probabilities")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    b = np.zeros(p.shape[1]) if bias is None else np.asarray(bias, dtype=np.float64)
    if b.shape != (p.shape[1],) or not np.isfinite(b).all():
        raise ValueError(f"bias must be a finite (C,) = ({p.shape[1]},) array, one offset per class, got shape "
                         f"{b.shape}")
    return _softmax(_logits(p) / temperature + b)


class TemperatureScaling(BaseEstimator):
    """Temperature scaling (Guo et al., ICML 2017) or, with ``bias=True``, BCTS (Alexandari et al., ICML 2020).

    The logits ``z = log p`` of the model's probabilities become ``z / T + b``; T (and b) minimise the mean
    negative log-likelihood of the labels with L-BFGS-B, T through ``log T`` so that it stays positive. Without
    bias ``b = 0``; with it, ``b[0] = 0`` (the softmax is invariant to adding a constant to every logit, so one bias
    is fixed) and the other ``C - 1`` are free. Fit it on the *source validation split*, not on the training data
    the model has fitted.

    Args:
        bias: False for temperature scaling (1 parameter), True for BCTS (C parameters).

    Attributes:
        temperature_: the fitted T.
        bias_: (C,) fitted biases (zeros without ``bias``; ``bias_[0]`` is always 0).
        n_classes_: C.
        nll_before_: mean negative log-likelihood (nats) of the fitting labels under the given probabilities.
        nll_after_: the same under the calibrated probabilities; never above ``nll_before_``.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> labels = rng.integers(0, 2, size=2000)
        >>> score = 2 * labels - 1 + rng.normal(size=2000)  # N(-1, 1) for class 0, N(1, 1) for class 1
        >>> overconfident = 1 / (1 + np.exp(-3 * 2 * score))  # 2 · score is the calibrated logit: x 3
        >>> scaler = TemperatureScaling().fit(overconfident, labels)
        >>> bool(abs(scaler.temperature_ - 3) < 0.2)  # undoes the x 3
        True
        >>> bool(scaler.nll_after_ < scaler.nll_before_)
        True
        >>> scaler.transform(overconfident).shape  # 1-D P(class 1) in, 1-D out
        (2000,)
    """

    def __init__(self, bias: bool = False) -> None:
        self.bias = bias
        self._check_params()

    def fit(self, probabilities: np.ndarray, labels: np.ndarray, *, temperature_init: float | None = None,
            bias_init: np.ndarray | None = None) -> "TemperatureScaling":
        """Fit T (and b) by maximum likelihood on labeled data.

        Args:
            probabilities: (N, C) class probabilities (C >= 2, rows summing to 1), or (N,) P(class 1) of a binary
                model.
            labels: (N,) integer classes in [0, C); at least two classes must be present.
            temperature_init: where the optimiser starts T (default 1); a warm start, e.g. from a fit on
                the whole data when refitting on bootstrap resamples of it.
            bias_init: (C,) where it starts b (default zeros); used only with ``bias=True``.

        Returns:
            self, fitted.
        """
        self._check_params()
        p = check_probabilities(probabilities, "probabilities")
        y = check_labels(labels, len(p), p.shape[1])
        if len(np.unique(y)) < 2:
            raise ValueError(f"labels hold only class {int(y[0])}: calibration needs labeled images of at least two "
                             "classes (fit it on the source validation split)")
        n_classes = p.shape[1]
        start = np.zeros(n_classes if self.bias else 1)
        if temperature_init is not None:
            if not (np.isfinite(temperature_init) and temperature_init > 0):
                raise ValueError(f"temperature_init must be a finite number > 0, got {temperature_init!r}")
            start[0] = np.clip(np.log(temperature_init), *_LOG_TEMPERATURE_BOUNDS)
        if bias_init is not None and self.bias:
            b0 = np.asarray(bias_init, dtype=np.float64)
            if b0.shape != (n_classes,) or not np.isfinite(b0).all():
                raise ValueError(f"bias_init must be a finite (C,) = ({n_classes},) array, got shape {b0.shape}")
            start[1:] = np.clip(b0[1:] - b0[0], *_BIAS_BOUNDS)  # only differences matter: make b[0] = 0

        logits = _logits(p)
        one_hot = np.eye(n_classes)[y]
        nll_before = _nll_and_gradient(np.zeros_like(start), logits, one_hot)[0]
        bounds = [_LOG_TEMPERATURE_BOUNDS] + [_BIAS_BOUNDS] * (len(start) - 1)
        result = minimize(_nll_and_gradient, start, args=(logits, one_hot), jac=True, method="L-BFGS-B",
                          bounds=bounds)
        theta, nll_after = result.x, float(result.fun)
        if not nll_after <= nll_before:  # a failed optimisation must not make the probabilities worse
            theta, nll_after = np.zeros_like(start), nll_before
        self.temperature_ = float(np.exp(theta[0]))
        self.bias_ = np.concatenate([[0.0], theta[1:]]) if self.bias else np.zeros(n_classes)
        self.n_classes_ = n_classes
        self.nll_before_ = float(nll_before)
        self.nll_after_ = nll_after
        return self

    def transform(self, probabilities: np.ndarray) -> np.ndarray:
        """The calibrated probabilities ``softmax(log p / temperature_ + bias_)``.

        Args:
            probabilities: (N, C) class probabilities with the C of the fit, or (N,) P(class 1) when C = 2.

        Returns:
            The calibrated probabilities, of the input's shape: (N, C), or (N,) P(class 1) for a 1-D input.
        """
        check_is_fitted(self, "temperature_")
        one_dimensional = np.ndim(probabilities) == 1
        p = check_probabilities(probabilities, "probabilities")
        if p.shape[1] != self.n_classes_:
            raise ValueError(f"probabilities have {p.shape[1]} classes but the calibration was fitted on "
                             f"{self.n_classes_}: transform the outputs of the same model")
        calibrated = _softmax(_logits(p) / self.temperature_ + self.bias_)
        return calibrated[:, 1] if one_dimensional else calibrated

    def _check_params(self) -> None:
        if not isinstance(self.bias, (bool, np.bool_)):
            raise ValueError(f"bias must be True (BCTS: a temperature and per-class biases) or False (temperature "
                             f"scaling), got {self.bias!r}")


def check_labels(labels: np.ndarray, n: int, n_classes: int, name: str = "labels") -> np.ndarray:
    """``labels`` as an (N,) int array, checked against the N rows and C classes of the probabilities.

    Args:
        labels: (N,) integer classes (integer-valued floats are accepted).
        n: N, the number of probability rows they label.
        n_classes: C.
        name: the argument's name in error messages.

    Returns:
        (N,) int64 array with values in [0, C).

    Examples:
        >>> check_labels(np.array([0.0, 1.0]), 2, 2)
        array([0, 1])
    """
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"{name} must be (N,) = ({n},), one class per row of the probabilities, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.number) and np.isfinite(y).all() and np.all(y == np.round(y))):
            raise ValueError(f"{name} must be integer classes; drop unlabeled images (NaN or -1) first")
    y = y.astype(np.int64)
    if (y < 0).any() or (y >= n_classes).any():
        raise ValueError(f"{name} must lie in [0, {n_classes}) for {n_classes} classes, got values "
                         f"{sorted(set(y.tolist()))[:10]}; drop unlabeled images (-1) first")
    return y


def check_probabilities(probabilities: np.ndarray, name: str = "probabilities") -> np.ndarray:
    """``probabilities`` as an (N, C) float64 array, from (N, C) or a binary model's (N,) P(class 1); checked.

    Args:
        probabilities: (N, C) class probabilities (C >= 2, each in [0, 1], rows summing to 1 within 1e-3), or (N,)
            P(class 1), which :func:`as_two_class` turns into (N, 2).
        name: the argument's name in error messages.

    Returns:
        (N, C) float64 array.

    Examples:
        >>> check_probabilities(np.array([0.25, 1.0]))
        array([[0.75, 0.25],
               [0.  , 1.  ]])
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim == 1:
        if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
            raise ValueError(f"{name} must hold probabilities in [0, 1] (no NaN or inf): apply a sigmoid to the "
                             "model's logit first")
        p = as_two_class(p)
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 2:
        raise ValueError(f"{name} must be (N, C) with N >= 1 and C >= 2 classes, or (N,) P(class 1) of a binary "
                         f"model; got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"{name} must hold probabilities in [0, 1] (no NaN or inf): apply a softmax to the model's "
                         "logits first")
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError(f"{name} rows must sum to 1 (class probabilities): apply a softmax to the model's logits "
                         "first")
    return p


def _logits(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, PROBABILITY_FLOOR, 1.0))


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _nll_and_gradient(theta: np.ndarray, logits: np.ndarray, one_hot: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean NLL of ``softmax(logits · exp(-θ[0]) + [0, θ[1:]])`` and its gradient in θ (analytic: L-BFGS-B then
    needs one evaluation per step instead of len(θ) + 1)."""
    scaled = logits * np.exp(-theta[0])
    s = scaled.copy()
    if len(theta) > 1:
        s[:, 1:] += theta[1:]
    s_max = s.max(axis=1, keepdims=True)
    e = np.exp(s - s_max)
    z = e.sum(axis=1, keepdims=True)
    n = len(s)
    nll = float((np.log(z) + s_max).sum() / n - (s * one_hot).sum() / n)
    residual = (e / z - one_hot) / n  # d NLL / d s
    gradient = np.empty_like(theta)
    gradient[0] = -(residual * scaled).sum()  # d s / d log T = -z / T
    gradient[1:] = residual[:, 1:].sum(axis=0)
    return nll, gradient
