"""Model modes and their promotion, and the evidence an admin decides on.

A model version is `silent` (recorded and monitored, sent nowhere),
`review-only` (the worklist, not the PACS) or `live`. A change applies from
the version's next result on: what was withheld stays withheld. The report
stage reads the mode (daemon/stages/report.py `_govern`); the web page and
the CLI change it here, never without a reason, and the change is audited
with the evidence the admin saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from daemon.config import Config
from daemon.stages.monitor.drift import DriftReport
from daemon.stages.monitor.performance import (
    Concordance,
    Performance,
    Subgroups,
    concordance,
    performance,
    subgroups,
)
from daemon.stages.monitor.watch import Monitor
from db import accounts, governance
from db.governance import MODES, ModeChange, ReviewedFinding, VersionSummary
from db.session import Database
from model.manifest import configured_manifests


class GovernanceError(Exception):
    """A mode change that cannot be made (unknown version or mode, no reason)."""


@dataclass(frozen=True)
class Evidence:
    """What a model version has earned, as the promotion page and the audit row show it."""

    version: VersionSummary
    performance: Performance
    # Other versions of the same model run on the same studies: their concordance.
    side_by_side: dict[str, Concordance] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        p = self.performance
        return {
            "runs": self.version.runs,
            "decided": p.decided,
            "ppv": _figures(p.ppv),
            "sensitivity": _figures(p.sensitivity),
            "npv": _figures(p.npv),
            "agreement": _figures(p.agreement),
            "side_by_side": {v: {"n": c.n, "agreement": _figures(c.agreement), "kappa": c.kappa}
                             for v, c in self.side_by_side.items()},  # fmt: skip
        }


@dataclass(frozen=True)
class MonitoringReport:
    """The committee's report of one model version over a period."""

    evidence: Evidence
    since: datetime | None
    until: datetime | None
    subgroups: list[Subgroups]
    history: list[ModeChange]
    operational: dict[str, Any]
    min_group_size: int
    drift: DriftReport | None = None  # None: no observation yet

    @property
    def turnaround_median(self) -> float | None:
        seconds = self.operational["turnaround"]
        return seconds[len(seconds) // 2] if seconds else None

    @property
    def turnaround_p95(self) -> float | None:
        seconds = self.operational["turnaround"]
        return seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))] if seconds else None


def _figures(interval: Any) -> dict[str, Any]:
    return {"estimate": interval.estimate, "low": interval.low, "high": interval.high,
            "n": interval.denominator}  # fmt: skip


class GovernanceService:
    def __init__(self, db: Database, config: Config) -> None:
        self.db = db
        self.config = config

    @property
    def default_mode(self) -> str:
        return self.config.monitoring.default_mode

    def configured(self) -> list[tuple[str, str]]:
        """The versions this site's workers load (`models.paths`), whether or not they ran:
        an admin sets a new version's mode before its first study."""
        folders = list(self.config.models.paths) or None
        return [(m.name, m.version) for m in configured_manifests(folders)]

    def versions(self) -> list[VersionSummary]:
        configured = self.configured()
        with self.db.session() as s:
            return governance.versions(s, self.default_mode, configured)

    def version(
        self, name: str, version: str, known: list[VersionSummary] | None = None
    ) -> VersionSummary:
        known = self.versions() if known is None else known
        for v in known:
            if (v.model_name, v.model_version) == (name, version):
                return v
        names = ", ".join(f"{v.model_name} {v.model_version}" for v in known) or "none"
        raise GovernanceError(
            f"model {name} {version} is not configured here and has not run (known: {names})"
        )

    def evidence(
        self, name: str, version: str, *, since: datetime | None = None,
        until: datetime | None = None, found: list[ReviewedFinding] | None = None,
        known: list[VersionSummary] | None = None,
    ) -> Evidence:  # fmt: skip
        """`found`, `known`: the version's reviewed findings in the period and the versions,
        when the caller has them already."""
        known = self.versions() if known is None else known
        summary = self.version(name, version, known)
        others = [v.model_version for v in known
                  if v.model_name == name and v.model_version != version and v.runs]  # fmt: skip
        with self.db.session() as s:
            if found is None:
                found = governance.reviewed_findings(s, name, version, since=since, until=until)
            pairs = {o: governance.paired_calls(s, name, version, o) for o in others}
        size = self.config.monitoring.min_group_size
        side = {o: concordance(p) for o, p in pairs.items() if p}
        return Evidence(summary, performance(found, min_group_size=size), side)

    def report(
        self, name: str, version: str, *, since: datetime | None = None,
        until: datetime | None = None,
    ) -> MonitoringReport:  # fmt: skip
        known = self.versions()
        self.version(name, version, known)  # an unknown version: GovernanceError, no figures
        with self.db.session() as s:
            found = governance.reviewed_findings(s, name, version, since=since, until=until)
            history = governance.mode_history(s, name, version)
            operational = governance.operational(s, name, version)
        evidence = self.evidence(name, version, found=found, known=known)
        size = self.config.monitoring.min_group_size
        drift = Monitor(self.db, self.config.monitoring).report(name, version)
        return MonitoringReport(evidence, since, until, subgroups(found, min_group_size=size),
                                history, operational, size, drift)  # fmt: skip

    def admin(self, username: str) -> str:
        """The user name of an enabled admin account: only an admin changes a mode."""
        with self.db.session() as s:
            user = accounts.get_user(s, username.strip())
            if user is None or user.disabled or user.role != "admin":
                raise GovernanceError(
                    f"{username!r} is not an enabled admin account (`secondreader user list`)"
                )
            return user.username

    def set_mode(self, name: str, version: str, mode: str, *, by: str, reason: str) -> ModeChange:
        """Change the version's mode from its next result on; audited with the evidence."""
        if mode not in MODES:
            raise GovernanceError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
        if not reason.strip():
            raise GovernanceError("a mode change needs a reason (it goes into the audit trail)")
        evidence = self.evidence(name, version)
        with self.db.session() as s:
            previous = governance.current_mode(s, name, version, self.default_mode)
            if previous == mode:
                raise GovernanceError(f"{name} {version} is already {mode}")
            return governance.set_mode(s, name, version, mode, changed_by=by,
                                       reason=reason.strip()[:2000],
                                       evidence=evidence.as_dict(), previous=previous)  # fmt: skip
