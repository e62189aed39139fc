"""The monitor stage's queries: what the drift watch reads, and its audit rows.

The observations themselves are db/monitoring.py's. What was already
reported is read back from the audit trail (`drift.new_value`,
`drift.alert`), so a restart reports nothing twice and no table is needed.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db import audit
from db.audit import EventType
from db.models import AuditEvent, RunObservation

ACTOR = "monitor"
# The columns whose new values are a new scanner (daemon/stages/monitor/drift.SCANNER).
_SCANNER_COLUMNS = {
    "manufacturer": RunObservation.manufacturer,
    "manufacturer_model": RunObservation.manufacturer_model,
    "kernel": RunObservation.kernel,
}


def versions(session: Session) -> list[tuple[str, str, datetime]]:
    """Every model version with observations, with its first observation's time."""
    rows = session.execute(
        select(
            RunObservation.model_name,
            RunObservation.model_version,
            func.min(RunObservation.analysed_at),
        )
        .group_by(RunObservation.model_name, RunObservation.model_version)
        .order_by(RunObservation.model_name, RunObservation.model_version)
    ).all()
    return [(m, v, first) for m, v, first in rows]


def count_before(session: Session, model: str, version: str, until: datetime) -> int:
    """The version's observations before `until` (its baseline's size)."""
    return int(
        session.scalar(
            select(func.count()).where(
                RunObservation.model_name == model,
                RunObservation.model_version == version,
                RunObservation.analysed_at < until,
            )
        )
        or 0
    )


def first_seen_values(
    session: Session, model: str, version: str, variable: str
) -> list[tuple[str, datetime]]:
    """Each value of a scanner column with its first observation (absent values left out)."""
    column = _SCANNER_COLUMNS[variable]
    rows = session.execute(
        select(column, func.min(RunObservation.analysed_at))
        .where(
            RunObservation.model_name == model,
            RunObservation.model_version == version,
            column.is_not(None),
        )
        .group_by(column)
    ).all()
    return [(str(value), first) for value, first in rows]


def _details(session: Session, event_type: str) -> list[dict[str, Any]]:
    stmt = select(AuditEvent.detail).where(AuditEvent.event_type == event_type)
    return [dict(d or {}) for d in session.scalars(stmt.order_by(AuditEvent.id))]


def reported_new_values(session: Session) -> set[tuple[str, str, str, str]]:
    """(model, version, variable, value) of every new value already reported."""
    return {
        (d.get("model", ""), d.get("version", ""), d.get("variable", ""), d.get("value", ""))
        for d in _details(session, EventType.DRIFT_NEW_VALUE)
    }


def new_values(session: Session, model: str, version: str) -> list[dict[str, Any]]:
    """The version's reported new values, in the order they were reported."""
    return [
        d
        for d in _details(session, EventType.DRIFT_NEW_VALUE)
        if d.get("model") == model and d.get("version") == version
    ]


def new_value_counts(session: Session) -> dict[tuple[str, str], int]:
    """New values reported per (model, version), for the metric."""
    return dict(
        Counter(
            (d.get("model", ""), d.get("version", ""))
            for d in _details(session, EventType.DRIFT_NEW_VALUE)
        )
    )


def record_new_value(
    session: Session, model: str, version: str, variable: str, value: str, first_seen: datetime
) -> None:
    audit.record(
        session, EventType.DRIFT_NEW_VALUE, ACTOR, model=model, version=version,
        variable=variable, value=value, first_seen=first_seen.isoformat(),
    )  # fmt: skip


def alerts(session: Session) -> list[dict[str, Any]]:
    """Every drift alert reported: model, version, start, end (ISO), n and variables."""
    return _details(session, EventType.DRIFT_ALERT)


def record_alert(
    session: Session,
    model: str,
    version: str,
    start: datetime,
    end: datetime,
    n: int,
    variables: dict[str, dict[str, Any]],
) -> None:
    """One period's alert; `variables` maps each alerting variable to its test, PSI and p."""
    audit.record(
        session, EventType.DRIFT_ALERT, ACTOR, model=model, version=version,
        start=start.isoformat(), end=end.isoformat(), n=n, variables=variables,
    )  # fmt: skip
