"""What a model is worth, measured where it was not trained: study-level figures with intervals.

Every built-in model is tested on studies from a *shifted* generator (other
noise, other kernels, other lesion sizes and places than it was trained on),
never on the training generator's own test split: a model that scores 0.999
on its own phantom can still miss a 5 mm nodule. The figures are per study,
the unit a radiologist reads:

- sensitivity and specificity at the manifest's threshold, with Wilson 95 %
  intervals (`model.intervals`): 19/20 says 0.76 to 0.99, not 0.95;
- the AUC with a DeLong 95 % interval, computed on the logit scale so it
  stays inside [0, 1] (DeLong, DeLong and Clarke-Pearson 1988). Where the
  classes separate perfectly DeLong's variance is 0 and says nothing; the
  interval is then the Wilson interval of a proportion of min(n+, n-) cases,
  a conservative stand-in that still shrinks as the test set grows;
- calibration: the expected calibration error (Naeini et al. 2015: equal-width
  bins, each bin's |observed frequency - mean probability| weighted by its
  share of the cases) and the Brier score (Brier 1950: the mean squared
  difference between probability and outcome) of the study probabilities;
- optionally the sensitivity per subgroup ("4-8 mm", "ground-glass"), so
  what the model misses is counted, not guessed.

`StudyEvaluation` is the manifest's `[evaluation]` table; `lines` is how
`model evaluate` and the web page's provenance say it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from model.intervals import Z95, Interval, wilson


class Subgroup(BaseModel):
    """Positive studies of one kind and how many of them the model called present."""

    model_config = ConfigDict(extra="forbid")
    positives: int = Field(ge=0)
    detected: int = Field(ge=0)

    def sensitivity(self) -> Interval:
        return wilson(self.detected, self.positives)


class StudyEvaluation(BaseModel):
    """Study-level figures on a shifted test set: the manifest's `[evaluation]`."""

    model_config = ConfigDict(extra="forbid")
    # How the test set was made, in words a reader can check ("shifted generator:
    # 4-30 mm nodules, 30 % ground-glass, sharp kernel, seed 1000").
    test_set: str
    n_positive: int = Field(ge=0)
    n_negative: int = Field(ge=0)
    threshold: float = Field(ge=0.0, le=1.0)
    sensitivity: float | None = None
    sensitivity_low: float | None = None
    sensitivity_high: float | None = None
    specificity: float | None = None
    specificity_low: float | None = None
    specificity_high: float | None = None
    auc: float | None = None
    auc_low: float | None = None
    auc_high: float | None = None
    ece: float | None = None
    brier: float | None = None
    subgroups: dict[str, Subgroup] = Field(default_factory=dict)

    def sensitivity_interval(self) -> Interval:
        return wilson(round((self.sensitivity or 0.0) * self.n_positive), self.n_positive)

    def specificity_interval(self) -> Interval:
        return wilson(round((self.specificity or 0.0) * self.n_negative), self.n_negative)

    def lines(self) -> list[tuple[str, str]]:
        """(label, sentence) pairs: what `model evaluate` prints and the web page shows."""
        out = [("Test set", f"{self.test_set}: {self.n_positive} studies with a finding, "
                            f"{self.n_negative} without")]  # fmt: skip
        out.append(("Sensitivity", _proportion(self.sensitivity_interval())))
        out.append(("Specificity", _proportion(self.specificity_interval())))
        if self.auc is not None:
            out.append(("AUC", f"{self.auc:.3f} (95 % CI {self.auc_low:.3f}-{self.auc_high:.3f})"))
        if self.ece is not None and self.brier is not None:
            out.append(("Calibration", f"ECE {self.ece:.3f}, Brier {self.brier:.3f}"))
        for name, group in self.subgroups.items():
            out.append((f"Sensitivity, {name}", _proportion(group.sensitivity())))
        return out


def _proportion(iv: Interval) -> str:
    if iv.estimate is None or iv.low is None or iv.high is None:
        return "n/a (no studies)"
    return (f"{iv.estimate:.2f} ({int(iv.numerator)}/{int(iv.denominator)}; "
            f"95 % CI {iv.low:.2f}-{iv.high:.2f})")  # fmt: skip


def delong_auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray,
               z: float = Z95) -> tuple[float, float, float]:
    """AUC with its 95 % interval: DeLong's variance, on the logit scale.

    Ties count one half (the Mann-Whitney statistic). Perfect separation
    (AUC 0 or 1) gives DeLong no variance; see the module's docstring.
    """
    y = np.asarray(labels, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("an AUC needs studies with and without a finding")
    # psi[i, j]: positive i ranked above negative j (1), tied (1/2), below (0).
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = float(psi.mean())
    if auc in (0.0, 1.0):
        n = min(pos.size, neg.size)
        iv = wilson(round(auc * n), n, z)
        assert iv.low is not None and iv.high is not None
        return auc, iv.low, iv.high
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    var = (np.var(v10, ddof=1) if pos.size > 1 else 0.0) / pos.size + (
        np.var(v01, ddof=1) if neg.size > 1 else 0.0) / neg.size
    logit = math.log(auc / (1 - auc))
    half = z * math.sqrt(var) / (auc * (1 - auc))
    return auc, 1 / (1 + math.exp(-(logit - half))), 1 / (1 + math.exp(-(logit + half)))


def evaluate_studies(
    labels: Sequence[int] | np.ndarray,
    probabilities: Sequence[float] | np.ndarray,
    threshold: float,
    test_set: str,
    subgroups: Mapping[str, Sequence[bool]] | None = None,
) -> StudyEvaluation:
    """Figures of one study probability per study against its truth (1: a finding).

    `subgroups` maps a name to a mask over the studies (positives of that kind);
    its sensitivity counts the masked positives called present.
    """
    y = np.asarray(labels, dtype=np.int64).ravel()
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if y.shape != p.shape or y.size == 0:
        raise ValueError("need one probability per study, at least one study")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ValueError("study probabilities must be finite and in [0, 1]")
    called = p >= threshold
    sens = wilson(int(np.sum(called & (y == 1))), int(np.sum(y == 1)))
    spec = wilson(int(np.sum(~called & (y == 0))), int(np.sum(y == 0)))
    auc = delong_auc(y, p) if 0 < y.sum() < y.size else (None, None, None)
    groups = {}
    for name, mask in (subgroups or {}).items():
        m = np.asarray(mask, dtype=bool).ravel() & (y == 1)
        groups[name] = Subgroup(positives=int(m.sum()), detected=int(np.sum(called & m)))
    return StudyEvaluation(
        test_set=test_set, n_positive=int(np.sum(y == 1)), n_negative=int(np.sum(y == 0)),
        threshold=threshold,
        sensitivity=sens.estimate, sensitivity_low=sens.low, sensitivity_high=sens.high,
        specificity=spec.estimate, specificity_low=spec.low, specificity_high=spec.high,
        auc=auc[0], auc_low=auc[1], auc_high=auc[2],
        ece=expected_calibration_error(y, p), brier=brier_score(y, p), subgroups=groups,
    )


@dataclass(frozen=True)
class Reliability:
    """Per equal-width bin: how many cases, their mean probability, how many were positive."""

    edges: np.ndarray  # (bins + 1,)
    counts: np.ndarray  # (bins,)
    mean_probability: np.ndarray  # (bins,), NaN where empty
    frequency: np.ndarray  # (bins,), observed fraction positive, NaN where empty


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> Reliability:
    """The reliability diagram's numbers; probability 1.0 falls in the last bin."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    if y.shape != p.shape or y.size == 0:
        raise ValueError("need as many probabilities as labels, at least one")
    if bins < 1:
        raise ValueError("bins must be >= 1")
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.floor(p * bins).astype(np.int64), 0, bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(index, weights=p, minlength=bins) / counts
        freq = np.bincount(index, weights=y, minlength=bins) / counts
    return Reliability(edges, counts.astype(np.int64), mean_p, freq)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """ECE: the count-weighted mean of |frequency - mean probability| over equal-width bins."""
    r = reliability(labels, probs, bins)
    filled = r.counts > 0
    gaps = np.abs(r.frequency[filled] - r.mean_probability[filled])
    return float(np.sum(r.counts[filled] * gaps) / r.counts.sum())


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean of (probability - outcome)^2: 0 is perfect, 0.25 is always saying 50 %."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    if y.shape != p.shape or y.size == 0:
        raise ValueError("need as many probabilities as labels, at least one")
    return float(np.mean((p - y) ** 2))
