"""APScheduler wiring: every timed job of the daemon is registered here."""

from __future__ import annotations

import logging
from collections.abc import Callable

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

log = logging.getLogger(__name__)


def _guarded(name: str, fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except Exception:
            # A failing tick must not kill the job; the next tick retries.
            log.exception("scheduled job %s failed", name)

    return run


class Scheduler:
    def __init__(self) -> None:
        self._sched = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(4)},
            # Never run two ticks of one job at once; a late tick is merged.
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
            timezone="UTC",
        )

    def every(self, name: str, seconds: float, fn: Callable[[], object]) -> None:
        self._sched.add_job(_guarded(name, fn), "interval", seconds=seconds, id=name, name=name)

    def start(self) -> None:
        self._sched.start()

    @property
    def running(self) -> bool:
        return bool(self._sched.running)

    def shutdown(self) -> None:
        if self._sched.running:
            self._sched.shutdown(wait=True)
