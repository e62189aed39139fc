"""Platt scaling; the two measures of how calibrated a probability is are in model.evaluation.

A network's sigmoid is a score, not a frequency: the built-in CT model's
negative series reach 0.98 on their most suspicious slice. Platt scaling
(Platt 1999) fits p = sigmoid(slope * logit + intercept) on validation data
by maximum likelihood, a logistic regression with one feature. The fit uses
Platt's smoothed targets, (N+ + 1) / (N+ + 2) for a positive and
1 / (N- + 2) for a negative, instead of 1 and 0: on separable data the
plain likelihood has no maximum (the slope grows without bound), the
smoothed one does, and it stays finite.

Expected calibration error (ECE, Naeini et al. 2015): equal-width bins of
the probability, each bin's |observed frequency - mean probability|,
weighted by its share of the cases. Brier score (Brier 1950): mean squared
difference between probability and outcome; lower is better for both.
"""

from __future__ import annotations

import numpy as np

from model.evaluation import brier_score, expected_calibration_error, reliability
from model.manifest import Calibration

# The two measures of calibration live with the other evaluation figures.
__all__ = ["brier_score", "expected_calibration_error", "fit_platt", "logit", "reliability"]

# Fewer of either class than this and the fit is noise, whatever the optimiser says.
MIN_PER_CLASS = 5


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warning for large |z|


def logit(p: float) -> float:
    """The inverse of the sigmoid, for turning a probability threshold into a logit one."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"no finite logit for probability {p}")
    return float(np.log(p) - np.log1p(-p))


def fit_platt(
    logits: np.ndarray, labels: np.ndarray, *, fitted_on: str = "", max_iter: int = 100
) -> Calibration:
    """Platt scaling fitted by Newton's method (IRLS) on 1-D logits and 0/1 labels.

    Raises ValueError for fewer than MIN_PER_CLASS examples of either class,
    non-finite logits, or logits that rank the labels the wrong way round
    (slope <= 0: the model is worse than chance on this data).
    """
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if z.shape != y.shape:
        raise ValueError(f"{z.size} logits for {y.size} labels")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinite values")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos + n_neg != y.size:
        raise ValueError("labels must be 0 or 1")
    if min(n_pos, n_neg) < MIN_PER_CLASS:
        raise ValueError(
            f"calibration needs at least {MIN_PER_CLASS} positive and {MIN_PER_CLASS} "
            f"negative examples, got {n_pos} and {n_neg}"
        )
    t = np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    x = np.column_stack([z, np.ones_like(z)])

    def loss(w: np.ndarray) -> float:
        s = x @ w  # -log-likelihood, written with logaddexp so it never takes log(0)
        return float(np.sum(t * np.logaddexp(0.0, -s) + (1.0 - t) * np.logaddexp(0.0, s)))

    # Platt's start: slope 0, the intercept of the prior odds.
    w = np.array([0.0, np.log((n_pos + 1.0) / (n_neg + 1.0))])
    current = loss(w)
    for _ in range(max_iter):
        p = _sigmoid(x @ w)
        grad = x.T @ (p - t)
        hess = (x * (p * (1.0 - p))[:, None]).T @ x + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        # Backtracking: a full Newton step can overshoot where the sigmoid is flat.
        scale = 1.0
        while scale > 1e-10:
            trial = w - scale * step
            new = loss(trial)
            if new <= current:
                break
            scale /= 2.0
        else:
            break
        w, improved = trial, current - new
        current = new
        if np.max(np.abs(scale * step)) < 1e-10 or improved < 1e-12 * max(1.0, current):
            break
    slope, intercept = float(w[0]), float(w[1])
    if not slope > 0.0:
        raise ValueError(f"the logits do not rank the labels (fitted slope {slope:.3g})")
    return Calibration(method="platt", slope=slope, intercept=intercept, fitted_on=fitted_on)
