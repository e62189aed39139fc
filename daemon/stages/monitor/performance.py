"""Performance of a model version from its reviewers' decisions, with confidence intervals.

The unit is a finding (one label of one run). Two strata, by what the AI said:

- AI positive: every one is in the worklist. PPV = upheld (confirmed or
  corrected) / decided.
- AI negative: a share `monitoring.negative_sample_fraction` is drawn into the
  worklist ("sampled for quality control"); the rest are never read. Among
  the drawn ones decided, FOR (false omission rate) = judged present /
  decided, and NPV = 1 - FOR.

Sensitivity comes from the whole population, each stratum weighted by its
size: TP = N+ x PPV and FN = N- x FOR (N- counts every AI negative, drawn or
not: a decided sampled negative stands for N- / n decided of them, the
inverse of its inclusion probability, as in a Horvitz-Thompson estimate).

    sensitivity = N+ PPV / (N+ PPV + N- FOR)

Its interval: Wilson intervals for PPV and FOR at 97.5 % each, so that both
hold together with at least 95 % (Bonferroni), then the bounds of the ratio,
which rises with PPV and falls with FOR. Conservative by construction.

The strata assume decisions are a random sample within each: reviewers do
not pick which AI negatives they read (they are drawn for them) and decide
the positives in worklist order, not by how hard a case looks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from db.governance import PairedCall, ReviewedFinding
from db.models import Decision, ReviewSelection
from model.intervals import Z95, Interval, wilson

__all__ = ["Z95", "Interval", "wilson", "Performance"]

Z975 = 2.241403  # two-sided 97.5 %: two intervals that hold together at 95 %

@dataclass
class Performance:
    """One model version's (or one subgroup's) figures."""

    group: str = "all"
    n_positive: int = 0  # AI-positive findings
    n_negative: int = 0  # AI-negative findings (drawn or not)
    positive_decided: int = 0
    positive_upheld: int = 0
    negative_drawn: int = 0  # sampled for quality control
    negative_decided: int = 0
    negative_present: int = 0  # the reader found it there: a miss
    decided: int = 0  # every decision, for agreement
    confirmed: int = 0
    too_few: bool = False  # fewer decisions than monitoring.min_group_size

    @property
    def ppv(self) -> Interval:
        return wilson(self.positive_upheld, self.positive_decided)

    @property
    def npv(self) -> Interval:
        return wilson(self.negative_decided - self.negative_present, self.negative_decided)

    @property
    def agreement(self) -> Interval:
        return wilson(self.confirmed, self.decided)

    @property
    def sensitivity(self) -> Interval:
        ppv = wilson(self.positive_upheld, self.positive_decided, Z975)
        miss = wilson(self.negative_present, self.negative_decided, Z975)
        if self.positive_decided == 0 or self.negative_decided == 0:
            return Interval(None, None, None, 0, 0)
        assert ppv.estimate is not None and ppv.low is not None and ppv.high is not None
        assert miss.estimate is not None and miss.low is not None and miss.high is not None

        def ratio(p: float, f: float) -> float:
            tp, fn = self.n_positive * p, self.n_negative * f
            return tp / (tp + fn) if tp + fn > 0 else 0.0

        tp = self.n_positive * ppv.estimate
        fn = self.n_negative * miss.estimate
        return Interval(ratio(ppv.estimate, miss.estimate), ratio(ppv.low, miss.high),
                        ratio(ppv.high, miss.low), round(tp, 2), round(tp + fn, 2))  # fmt: skip


def performance(
    findings: Iterable[ReviewedFinding], *, group: str = "all", min_group_size: int = 10
) -> Performance:
    out = Performance(group)
    for f in findings:
        if f.present:
            out.n_positive += 1
        else:
            out.n_negative += 1
        # Before governance (selection None) every negative was in the worklist: drawn.
        drawn = f.present or f.selection in (None, ReviewSelection.SAMPLED_NEGATIVE)
        if not f.present and drawn:
            out.negative_drawn += 1
        if f.decision is None or not drawn:
            continue  # an undrawn negative decided anyway would bias the sample
        out.decided += 1
        out.confirmed += f.decision == Decision.CONFIRM
        if f.present:
            out.positive_decided += 1
            out.positive_upheld += f.decision != Decision.REJECT
        else:
            out.negative_decided += 1
            # Rejecting "absent" says it is there; correcting places it: both a miss.
            out.negative_present += f.decision != Decision.CONFIRM
    out.too_few = out.decided < min_group_size
    return out


# Subgroups the committee looks at, and how a finding's value is read.
SUBGROUPS: dict[str, Callable[[ReviewedFinding], str | None]] = {
    "sex": lambda f: f.patient_sex,
    "age band": lambda f: f.age_band,
    "manufacturer": lambda f: f.manufacturer,
    "sending AE title": lambda f: f.calling_ae,
}


@dataclass
class Subgroups:
    variable: str
    groups: list[Performance] = field(default_factory=list)


def subgroups(findings: Sequence[ReviewedFinding], *, min_group_size: int = 10) -> list[Subgroups]:
    """Each subgroup variable's groups (unknown values as "unknown"), largest first."""
    out = []
    for variable, key in SUBGROUPS.items():
        by: dict[str, list[ReviewedFinding]] = defaultdict(list)
        for f in findings:
            by[key(f) or "unknown"].append(f)
        groups = [performance(rows, group=value, min_group_size=min_group_size)
                  for value, rows in by.items()]  # fmt: skip
        groups.sort(key=lambda g: (-g.decided, g.group))
        out.append(Subgroups(variable, groups))
    return out


@dataclass(frozen=True)
class Concordance:
    """Champion and challenger on the same studies: how often they call the same."""

    n: int
    both_present: int
    both_absent: int
    only_first: int
    only_second: int

    @property
    def agreement(self) -> Interval:
        return wilson(self.both_present + self.both_absent, self.n)

    @property
    def kappa(self) -> float | None:
        """Cohen's kappa: agreement beyond what their call rates give by chance."""
        if self.n == 0:
            return None
        observed = (self.both_present + self.both_absent) / self.n
        first = (self.both_present + self.only_first) / self.n
        second = (self.both_present + self.only_second) / self.n
        chance = first * second + (1 - first) * (1 - second)
        return 1.0 if chance >= 1 else (observed - chance) / (1 - chance)


def concordance(pairs: Iterable[PairedCall]) -> Concordance:
    both = neither = first = second = 0
    for p in pairs:
        if p.first and p.second:
            both += 1
        elif p.first:
            first += 1
        elif p.second:
            second += 1
        else:
            neither += 1
    return Concordance(both + neither + first + second, both, neither, first, second)
