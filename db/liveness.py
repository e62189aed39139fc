"""Which processes are alive: each records a beat here every few seconds.

`serve`, each receiving process and each `secondreader worker` beat
(daemon/liveness.py runs the thread). `status`, the Operations page,
/healthz and /metrics read them: a queue with jobs and no live worker is the
silent failure an administrator most needs to hear about.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import Job, JobState, ProcessHeartbeat, utcnow


@dataclass(frozen=True)
class ProcessView:
    name: str
    kind: str
    host: str
    pid: int
    started_at: datetime
    beat_at: datetime
    stopped_at: datetime | None

    def alive(self, now: datetime, limit: timedelta) -> bool:
        return self.stopped_at is None and now - self.beat_at <= limit


def beat(session: Session, *, name: str, kind: str, host: str, pid: int,
         started_at: datetime, now: datetime | None = None) -> None:  # fmt: skip
    now = now or utcnow()
    row = session.scalars(select(ProcessHeartbeat).where(ProcessHeartbeat.name == name)).first()
    if row is None:
        session.add(ProcessHeartbeat(name=name, kind=kind, host=host, pid=pid,
                                     started_at=started_at, beat_at=now))  # fmt: skip
    else:
        row.beat_at, row.stopped_at, row.started_at = now, None, started_at


def stopped(session: Session, name: str, now: datetime | None = None) -> None:
    session.execute(update(ProcessHeartbeat).where(ProcessHeartbeat.name == name)
                    .values(stopped_at=now or utcnow()))  # fmt: skip


def processes(session: Session, since: datetime | None = None) -> list[ProcessView]:
    """Every process that beat since `since` (all when None), the latest first."""
    stmt = select(ProcessHeartbeat).order_by(ProcessHeartbeat.beat_at.desc())
    if since is not None:
        stmt = stmt.where(ProcessHeartbeat.beat_at >= since)
    return [ProcessView(p.name, p.kind, p.host, p.pid, p.started_at, p.beat_at, p.stopped_at)
            for p in session.scalars(stmt)]  # fmt: skip


@dataclass(frozen=True)
class WorkerAlert:
    """Jobs wait while no worker is alive: the oldest has waited `waiting` this long."""

    queued: int
    waiting: timedelta


def no_worker_alert(session: Session, *, limit: timedelta, alert_after: timedelta,
                    now: datetime | None = None) -> WorkerAlert | None:  # fmt: skip
    """The alert, or None: a live worker exists, or no job has waited past `alert_after`."""
    now = now or utcnow()
    alive = [p for p in processes(session, now - limit) if p.kind == "worker"
             and p.alive(now, limit)]  # fmt: skip
    if alive:
        return None
    queued, oldest = session.execute(
        select(func.count(), func.min(Job.created_at)).where(Job.state == JobState.QUEUED)
    ).one()
    if not queued or oldest is None or now - oldest < alert_after:
        return None
    return WorkerAlert(int(queued), now - oldest)
