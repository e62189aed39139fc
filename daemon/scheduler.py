"""APScheduler wiring: every timed job of the daemon is registered here.

The intervals are the safety net. When a stage hands work to the next one
(a job queued, a run recorded, an outbox row added), it calls `wake(name)`
and the next stage's job runs at once instead of at its next tick. A wake
while the job runs makes it run once more right after, so no hand-off waits
for an interval and no tick is skipped.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from db.session import database_unavailable

log = logging.getLogger(__name__)


class _Job:
    def __init__(self, name: str, fn: Callable[[], object]) -> None:
        self.name = name
        self.fn = fn
        self.lock = threading.Lock()
        self.running = False
        self.again = False
        # Ticks failed in a row because the database was unavailable.
        self.unavailable = 0

    def __call__(self) -> None:
        with self.lock:
            self.running = True
        try:
            while True:
                with self.lock:
                    self.again = False
                try:
                    self.fn()
                except Exception as exc:
                    # A failing tick must not kill the job; the next tick retries.
                    self._failed(exc)
                else:
                    self._succeeded()
                with self.lock:
                    if not self.again:
                        return
        finally:
            with self.lock:
                self.running = False

    def _failed(self, exc: Exception) -> None:
        if not database_unavailable(exc):
            log.exception("scheduled job %s failed", self.name)
            return
        # The database is locked or gone: one line per outage, not a traceback
        # per tick (a tick every 0.5 s for the completer).
        self.unavailable += 1
        if self.unavailable == 1:
            log.error(
                "scheduled job %s: database unavailable (%s); retried at each tick",
                self.name,
                type(exc).__name__,
            )
        log.debug("scheduled job %s failed", self.name, exc_info=exc)

    def _succeeded(self) -> None:
        if self.unavailable:
            log.warning(
                "scheduled job %s: database back after %d failed tick(s)",
                self.name,
                self.unavailable,
            )
            self.unavailable = 0

    def wake_running(self) -> bool:
        """True if the job is running now: it then runs once more when done."""
        with self.lock:
            if self.running:
                self.again = True
            return self.running


class Scheduler:
    def __init__(self) -> None:
        self._sched = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(4)},
            # Never run two ticks of one job at once; a late tick is merged.
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
            timezone="UTC",
        )
        self._jobs: dict[str, _Job] = {}

    def every(self, name: str, seconds: float, fn: Callable[[], object]) -> None:
        job = _Job(name, fn)
        self._jobs[name] = job
        self._sched.add_job(job, "interval", seconds=seconds, id=name, name=name)

    def wake(self, name: str) -> None:
        """Run job `name` now (or once more right after its current run)."""
        job = self._jobs.get(name)
        if job is None or not self._sched.running or job.wake_running():
            return
        with contextlib.suppress(JobLookupError):  # shutting down
            self._sched.modify_job(name, next_run_time=datetime.now(UTC))

    def wake_at(self, name: str, when: datetime) -> None:
        """Run job `name` at `when` (aware UTC) if that is before its next tick.

        The completer's quiet window ends at a known time: the study completes
        then, not up to a check interval later.
        """
        job = self._sched.get_job(name) if self._sched.running else None
        if job is None or (job.next_run_time is not None and job.next_run_time <= when):
            return
        with contextlib.suppress(JobLookupError):
            self._sched.modify_job(name, next_run_time=when)

    def start(self) -> None:
        self._sched.start()

    @property
    def running(self) -> bool:
        return bool(self._sched.running)

    def shutdown(self) -> None:
        if self._sched.running:
            self._sched.shutdown(wait=True)
