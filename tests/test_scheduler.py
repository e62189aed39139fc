"""The scheduler's wake-ups: `wake` runs a job now, `wake_at` at a given time."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from daemon.scheduler import Scheduler


def test_wake_at_runs_a_job_before_its_interval_and_never_delays_it() -> None:
    ran = threading.Event()
    sched = Scheduler()
    sched.every("hourly", 3600, ran.set)
    sched.start()
    try:
        job = sched._sched.get_job("hourly")
        tick = job.next_run_time
        # Later than the next tick: ignored, the tick is not moved.
        sched.wake_at("hourly", tick + timedelta(minutes=5))
        assert sched._sched.get_job("hourly").next_run_time == tick
        # Earlier: the job runs then, an hour before its interval would.
        sched.wake_at("hourly", datetime.now(UTC) + timedelta(milliseconds=200))
        assert ran.wait(60)
        # Unknown jobs are ignored.
        sched.wake_at("nothing", datetime.now(UTC))
    finally:
        sched.shutdown()
