"""Stage 4, infer: take analysis jobs from the queue, run the models, record the results.

A worker is one thread that claims a job under a lease, renews the lease
from a heartbeat thread while the analysis runs, and records either the
results or the failure. `secondreader serve` runs one in-process worker;
`secondreader worker` runs one as its own process (several may run against
one PostgreSQL database, or SQLite on one machine). The analyser (the
models) is built once per worker, before the first job.

Stopping (SIGTERM): the current job gets `worker.stop_seconds` to finish,
then goes back to the queue without counting an attempt; the analysis still
running is abandoned, and its results would be refused (the lease is gone).
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from daemon.config import Config, WorkerConfig
from daemon.stages.analyse.analyser import Analyser
from daemon.stages.analyse.stream import ReadsAhead, Streamer
from db import queue
from db.notify import JOBS, Listener
from db.queue import ClaimedJob, LeaseLost, RetryPolicy
from db.session import Database
from dicom_io.text import safe_error

log = logging.getLogger(__name__)

AnalyserFactory = Callable[[], Analyser]


def retry_policy(settings: WorkerConfig) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=settings.max_attempts,
        backoff_seconds=settings.retry_backoff_seconds,
        backoff_max_seconds=settings.retry_backoff_max_seconds,
    )


def analyser_factory(config: Config) -> AnalyserFactory:
    """What builds the worker's analyser: the configured models, unless `worker.analyser` names
    another "module:callable" taking the Config (the tests' stand-ins)."""
    spec = config.worker.analyser
    if not spec:

        def models() -> Analyser:
            from daemon.stages.analyse.analyser import ModelAnalyser

            return ModelAnalyser.from_config(config)

        return models
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"worker.analyser must be 'module:callable', not {spec!r}")

    def custom() -> Analyser:
        factory = getattr(importlib.import_module(module_name), attr)
        return factory(config)

    return custom


def requeue_expired_jobs(db: Database, policy: RetryPolicy, actor: str) -> list[int]:
    """Jobs of dead or hung workers back to the queue (scheduled in `serve`, run by workers)."""
    with db.session() as s:
        ids = queue.requeue_expired(s, policy, actor=actor)
    if ids:
        log.warning("lease expired on job(s) %s: taken back from their worker", ids)
    return ids


class _Heartbeat(threading.Thread):
    """Renews one job's lease until stopped; notes when the lease was lost."""

    def __init__(self, db: Database, job: ClaimedJob, settings: WorkerConfig) -> None:
        super().__init__(name=f"heartbeat-{job.job_id}", daemon=True)
        self.db = db
        self.job = job
        self.lease_seconds = settings.lease_seconds
        self.interval = settings.heartbeat_seconds
        self.done = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            try:
                with self.db.session() as s:
                    ours = queue.renew_lease(s, self.job, lease_seconds=self.lease_seconds)
            except Exception:
                # A database hiccup: try again next beat; the lease has slack.
                log.exception("could not renew the lease of job %d", self.job.job_id)
                continue
            if not ours:
                log.warning("job %d: lease lost; its result will be discarded", self.job.job_id)
                self.lost.set()
                return

    def stop(self) -> None:
        self.done.set()
        self.join()


class Worker:
    def __init__(
        self,
        db: Database,
        make_analyser: AnalyserFactory,
        settings: WorkerConfig,
        *,
        spool_dir: Path,
        state_dir: Path,
        name: str = "worker",
    ) -> None:
        self.db = db
        self.settings = settings
        self.policy = retry_policy(settings)
        self.spool_dir = spool_dir
        self.state_dir = state_dir
        # Unique per worker and run: a restarted worker must not renew its predecessor's leases.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{name}:{uuid.uuid4().hex[:8]}"
        self._make_analyser = make_analyser
        self.analyser: Analyser | None = None
        self._stop = threading.Event()
        # Set by `wake` (a job was queued) and by stop: the idle wait ends at once.
        self._wake = threading.Event()
        # Called after each recorded result or failure: the report stage's wake-up.
        self.on_recorded: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._current: ClaimedJob | None = None
        self._thread: threading.Thread | None = None
        self._next_reap = 0.0
        self.failed = False
        # Reads the images of studies still arriving ahead of their job (stream.py).
        self.streamer: Streamer | None = None

    @classmethod
    def from_config(cls, config: Config, db: Database, name: str = "worker") -> Worker:
        return cls(
            db,
            analyser_factory(config),
            config.worker,
            spool_dir=config.storage.spool_dir,
            state_dir=config.storage.state_dir,
            name=name,
        )

    # -- life cycle ------------------------------------------------------------

    def load(self) -> None:
        """Build the analyser (load the models) once; every job reuses it."""
        if self.analyser is None:
            self.analyser = self._make_analyser()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="worker", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        return self.is_alive() and not self.failed

    @property
    def live(self) -> bool:
        """Healthy, or not started yet: what the worker's heartbeat stands for."""
        return self._thread is None or self.healthy

    def request_stop(self) -> None:
        """Take no new job; the current one goes on (see `stop`)."""
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        """A job was queued: look now rather than after the poll interval."""
        self._wake.set()

    def stream_wake(self) -> None:
        """An instance was received: the streamer looks now."""
        if self.streamer is not None:
            self.streamer.wake()

    def _start_streaming(self) -> None:
        if not self.settings.streaming or self.streamer is not None:
            return
        if not isinstance(self.analyser, ReadsAhead):
            return  # a stand-in analyser (tests): nothing to read ahead for
        self.streamer = Streamer(
            self.db, self.analyser, self.settings, spool_dir=self.spool_dir
        ).start()
        log.info("streaming: images are read and analysed as they arrive")

    def stop(self, grace_seconds: float) -> None:
        """Let the current job finish for `grace_seconds`, else give it back to the queue."""
        self._stop.set()
        self._wake.set()
        if self.streamer is not None:
            self.streamer.stop()
        if self._thread is not None:
            self._thread.join(grace_seconds)
        with self._lock:
            job = self._current
        if job is None:
            return
        try:
            with self.db.session() as s:
                released = queue.release_job(s, job)
        except Exception:
            log.exception("could not release job %d; its lease will expire", job.job_id)
            return
        if released:
            log.info("job %d released: back to the queue for another worker", job.job_id)

    # -- the loop --------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self.load()
        except Exception:
            log.exception("cannot build the analyser (models); this worker takes no jobs")
            self.failed = True
            return
        # What start-up made (modules, the models, the ORM's mappers: some
        # 200,000 objects) lives as long as the process; frozen, the cyclic
        # garbage collector stops walking it on every full pass. Those passes
        # fell in the middle of loading a series (its 300 headers are many
        # small objects) and doubled its time.
        gc.freeze()
        _no_hugepage_advice()
        self._start_streaming()
        log.info("worker %s taking jobs", self.owner)
        while not self._stop.is_set():
            try:
                self._reap_if_due()
                busy = self.run_once()
            except Exception:
                # The database is down or similar: keep the worker, try again later.
                log.exception("worker loop error")
                busy = False
            if not busy:
                self._wake.wait(self.settings.poll_seconds)
                self._wake.clear()

    def _reap_if_due(self) -> None:
        if time.monotonic() < self._next_reap:
            return
        self._next_reap = time.monotonic() + self.settings.heartbeat_seconds
        requeue_expired_jobs(self.db, self.policy, self.owner)

    def run_once(self) -> bool:
        """Claim and process one due job; False when there was none."""
        if self._stop.is_set():
            return False
        self.load()
        with self.db.session() as s:
            job = queue.claim_next(s, self.owner, lease_seconds=self.settings.lease_seconds)
        if job is None:
            return False
        with self._lock:
            self._current = job
        try:
            self._process(job)
        finally:
            with self._lock:
                self._current = None
        if self.on_recorded is not None:
            self.on_recorded()
        return True

    def _process(self, job: ClaimedJob) -> None:
        log.info(
            "job %d claimed: study %s, attempt %d", job.job_id, job.study_instance_uid, job.attempt
        )
        assert self.analyser is not None
        heartbeat = _Heartbeat(self.db, job, self.settings)
        heartbeat.start()
        started = time.monotonic()
        try:
            with self.db.session() as s:
                series = queue.study_series_files(s, job.study_id)
            files = {e.series_instance_uid: [self.spool_dir / p for p in e.paths] for e in series}
            results = self.analyser.analyse(job.study_instance_uid, files)
        except Exception as exc:
            heartbeat.stop()
            self._record_failure(job, exc)
            return
        heartbeat.stop()
        try:
            with self.db.session() as s:
                state = queue.finish_job(s, job, results, state_dir=self.state_dir)
        except LeaseLost:
            log.warning("job %d: lease lost while analysing; result discarded", job.job_id)
            return
        except Exception as exc:
            # Results that cannot be recorded are a failed attempt like any other.
            self._record_failure(job, exc)
            return
        log.info(
            "job %d %s in %.1f s: %s",
            job.job_id,
            state,
            time.monotonic() - started,
            ", ".join(f"{r.outcome}" for r in results),
        )

    def _record_failure(self, job: ClaimedJob, exc: Exception) -> None:
        # Our own exception messages carry UIDs and paths; a library's may quote
        # a dataset value (a name, a birth date): scrubbed before log and row.
        error = safe_error(exc)
        log.warning("job %d attempt %d failed: %s", job.job_id, job.attempt, error)
        log.debug("job %d traceback", job.job_id, exc_info=exc)
        try:
            with self.db.session() as s:
                state = queue.fail_attempt(s, job, error, self.policy)
        except LeaseLost:
            log.warning("job %d: lease lost; failure not recorded", job.job_id)
            return
        if state == "failed":
            log.error("job %d failed after %d attempts", job.job_id, job.attempt)


def run_worker(config: Config) -> int:
    """`secondreader worker`: one worker process until SIGTERM/SIGINT. Returns the exit code."""
    from daemon.factories import open_database
    from daemon.liveness import Heartbeat
    from daemon.memory import keep_freed_memory

    if config.worker.keep_memory_mb:
        keep_freed_memory(config.worker.keep_memory_mb)
    # With the audit key (its events are signed), checked against the database's;
    # no schema or another key: one line and exit 2 (daemon/cli/).
    db = open_database(config)
    worker = Worker.from_config(config, db)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        worker.load()
    except Exception:
        log.exception("cannot build the analyser (models)")
        db.dispose()
        return 1
    worker.start()
    heartbeat = Heartbeat(db, "worker", config.worker.liveness_seconds).start()
    # PostgreSQL: a job queued by serve wakes this worker at once (db/notify.py).
    listener = Listener(config.database_url, {JOBS: worker.wake})
    listener.start()
    log.info("secondreader worker ready (%s)", worker.owner)
    rc = 0
    # The main thread only waits, so a signal is handled at once even while
    # the worker thread is deep inside the model.
    while not stop.wait(0.5):
        if not worker.is_alive():
            log.error("worker thread ended unexpectedly")
            rc = 1
            break
    listener.stop()
    worker.stop(config.worker.stop_seconds)
    heartbeat.stop()
    db.dispose()
    log.info("secondreader worker stopped")
    return rc


def _no_hugepage_advice() -> None:
    """Stop numpy asking the kernel for huge pages for its large arrays.

    numpy madvises every array over 4 MB as MADV_HUGEPAGE. On a host whose
    memory is fragmented (a server that has run for a while, or this one
    after receiving a study) the kernel then compacts memory on the first
    touch: filling a 300-slice volume took 1.3 s instead of 0.5 s here
    (bench/e2e.py, NUMPY_MADVISE_HUGEPAGE=0 against 1). The switch is
    numpy's own (its documented environment variable, at run time);
    without it nothing changes but the speed.
    """
    import numpy as np

    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            switch = getattr(importlib.import_module(module), "_set_madvise_hugepage", None)
        except ImportError:
            continue
        if callable(switch):
            switch(False)
            return
    log.debug("numpy %s: hugepage advice left as it is", np.__version__)

