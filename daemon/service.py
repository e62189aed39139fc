"""Process life of `secondreader serve`: start the stages, notify systemd, stop cleanly."""

from __future__ import annotations

import gc
import logging
import signal
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from daemon.config import Config
from daemon.errors import NotMigrated, check_port_free
from daemon.factories import open_database, scp_settings
from daemon.liveness import Heartbeat, gone_after, worker_alert
from daemon.memory import keep_freed_memory
from daemon.metrics import serve_metrics
from daemon.scheduler import Scheduler
from daemon.stages.analyse.worker import Worker, requeue_expired_jobs, retry_policy
from daemon.stages.complete import Completer
from daemon.stages.deliver import Dispatcher
from daemon.stages.monitor.watch import Monitor
from daemon.stages.pull import Puller
from daemon.stages.receive.receiver import Receiver
from daemon.stages.receive.receivers import ReceiverPool
from daemon.stages.report import Reporter
from daemon.stages.retain import Cleaner
from daemon.stages.review import ReviewService
from daemon.stages.seal import seal_audit_trail
from daemon.systemd import Notifier
from daemon.web.server import serve_web
from db.notify import RUNS, Listener
from dicom_io.scp import StorageSCP
from dicom_io.spool import Spool

log = logging.getLogger(__name__)

__all__ = ["NotMigrated", "Service", "open_database", "scp_settings", "worker_alert"]


# The new-scanner check's safety net, for runs no wake-up announced (a
# `secondreader worker` process on SQLite); recorded runs wake it at once.
_NEW_VALUE_CHECK_SECONDS = 60.0
# After a quiet window's end, so that the study is due when the completer looks.
_TICK_MARGIN = timedelta(milliseconds=20)


def _warm_up() -> None:
    """Preload what the report stage reads once, then freeze start-up's objects.

    Modules, the ORM's mappers and highdicom's tables (some 200,000 objects)
    live as long as the process. Frozen, the cyclic garbage collector's full
    passes skip them: unfrozen, each pass took 90 ms or more with the GIL
    held, a stall of every association this process serves.
    """
    Reporter.warm_up()
    gc.freeze()


class Service:
    def __init__(self, config: Config) -> None:
        if config.worker.in_process and config.worker.keep_memory_mb:
            # Before any thread starts: they then share the kept memory.
            keep_freed_memory(config.worker.keep_memory_mb)
        self.config = config
        self.stop_event = threading.Event()
        self.notifier = Notifier()
        self.db = open_database(config)
        self.spool = Spool(config.storage.spool_dir, fsync=config.storage.fsync)
        ancillary = (
            Spool(config.storage.ancillary_dir, fsync=config.storage.fsync)
            if config.scp.non_image_objects == "store"
            else None
        )
        # More receiving processes on the same port (daemon/stages/receive/receivers.py).
        self.scheduler = Scheduler()
        self.receivers = (
            ReceiverPool(config, lambda: self.scheduler.wake("complete-studies"))
            if config.scp.processes > 1
            else None
        )
        board = self.receivers.board() if self.receivers is not None else None
        self.receiver = Receiver(
            self.db,
            self.spool,
            config.scp.max_associations,
            ancillary=ancillary,
            others_busy=board.others_busy if board is not None else None,
            store_deadline=config.scp.store_deadline_seconds,
        )
        self.completer = Completer(
            self.db, config.completion.stable_seconds, config.completion.max_seconds
        )
        # Report and deliver stages. Storage commitment reports come back to
        # our SCP, on an association the PACS opens: the SCP hands them over.
        self.reporter = Reporter(self.db, config)
        self.dispatcher = Dispatcher(self.db, config)
        self.scp = StorageSCP(
            scp_settings(config, load_board=board),
            self.receiver.on_store,
            self.receiver.on_association,
            on_commitment=(
                self.dispatcher.on_commitment if self.dispatcher.wants_commitment else None
            ),
            on_mpps=self.receiver.on_mpps if config.scp.accept_mpps else None,
            on_refused=self.receiver.on_refused,
        )
        self.metrics_server: Any = None
        self.heartbeats: list[Heartbeat] = []
        self.web_server: Any = None
        # Each stage's job; a stage that hands work on wakes the next one
        # (daemon/scheduler.py), the intervals are the safety net.
        self.scheduler.every(
            "complete-studies", config.completion.check_interval_seconds, self.complete_studies
        )
        self.scheduler.every("report", config.report.check_interval_seconds, self.reporter.run_once)
        # The SR goes out as soon as it is queued, the other objects after.
        self.reporter.on_queued = lambda: self.scheduler.wake("deliver")
        self.scheduler.every(
            "deliver", config.delivery.check_interval_seconds, self.dispatcher.run_once
        )
        # Infer stage: one worker thread here unless workers run as their own processes.
        self.worker = Worker.from_config(config, self.db) if config.worker.in_process else None
        if self.worker is not None:
            self.worker.on_recorded = self.recorded
            # Each stored instance wakes the worker's streamer (if it streams).
            self.receiver.on_stored = self.worker.stream_wake
        # PostgreSQL: runs recorded by `secondreader worker` processes wake the
        # report stage here at once (db/notify.py).
        self.listener = Listener(config.database_url, {RUNS: self.recorded})
        # Governance: a new scanner is reported as its first run is recorded;
        # drift is computed per period on its own interval, and once at start.
        self.monitor = Monitor(self.db, config.monitoring)
        self.scheduler.every("monitor", _NEW_VALUE_CHECK_SECONDS, self.monitor.run_once)
        self.scheduler.every("drift", config.monitoring.drift_interval_seconds, self.monitor.drift)
        # MPPS: the last listed instance (or the N-SET after it) completes the study now.
        self.receiver.on_ready = lambda: self.scheduler.wake("complete-studies")
        # Jobs of a dead worker (any process) go back to the queue even when no worker runs.
        policy = retry_policy(config.worker)
        self.scheduler.every(
            "requeue-expired-jobs",
            config.worker.heartbeat_seconds,
            lambda: requeue_expired_jobs(self.db, policy, "serve"),
        )
        # Review rounds a crash left without their verified SR (daemon/stages/review.py).
        self.reviewer = ReviewService(self.db, config)
        self.scheduler.every(
            "finalize-reviews", config.report.check_interval_seconds, self.finalize
        )
        # Jobs waiting with no live worker: said in the log when it starts and ends.
        self._alerting = False
        self.scheduler.every("watch-workers", gone_after(config).total_seconds(),
                             self.watch_workers)  # fmt: skip
        # The audit trail's single chain writer (db/chain.py).
        self.scheduler.every("seal-audit", config.audit.seal_interval_seconds, self.seal_audit)
        # Scheduled pull: new studies from the PACS, each asked for once.
        if config.pull.enabled:
            self.puller = Puller(self.db, config)
            self.scheduler.every("pull", config.pull.interval_seconds, self.puller.run_once)
        # Retention: files of finished studies, by age and by disk watermark.
        self.cleaner = Cleaner(self.db, config)
        if config.retention.enabled:
            self.scheduler.every(
                "retention", config.retention.check_interval_seconds, self.cleaner.run_once
            )

    def healthy(self) -> bool:
        """What /healthz reports: the SCP's accept loop and the scheduler turn, and no
        job waits past `worker.no_worker_alert_seconds` without a live worker."""
        return self.scheduler.running and self.scp.is_alive() and self.worker_alert() is None

    def worker_alert(self) -> str | None:
        """The no-live-worker alert in words, or None (also None when the database is away:
        that is the metrics' `database_up`, not a missing worker)."""
        return worker_alert(self.db, self.config)

    def watch_workers(self) -> None:
        alert = self.worker_alert()
        if alert and not self._alerting:
            log.warning("%s", alert)
        elif self._alerting and not alert:
            log.info("a worker is running again: the queue is served")
        self._alerting = alert is not None

    def recorded(self) -> None:
        """A run was recorded: its report, and its observation's new-scanner check."""
        self.scheduler.wake("report")
        self.scheduler.wake("monitor")

    def seal_audit(self) -> None:
        seal_audit_trail(self.db)

    def finalize(self) -> None:
        if self.reviewer.finalize_pending():
            self.scheduler.wake("deliver")
        self.release_at(self.reviewer.next_release())

    def release_at(self, due: datetime | None) -> None:
        """Build a held verified SR when its undo window ends, not a tick later."""
        if due is not None:
            when = max(due.replace(tzinfo=UTC) + _TICK_MARGIN, datetime.now(UTC))
            self.scheduler.wake_at("finalize-reviews", when)

    def complete_studies(self) -> None:
        if self.completer.run_once():
            self.receiver.refresh_mpps_waiting()
            if self.worker is not None:
                self.worker.wake()
        due = self.completer.next_due()
        now = datetime.now(UTC)
        if due is not None and (when := due.replace(tzinfo=UTC) + _TICK_MARGIN) > now:
            # The precise tick; the check interval stays the safety net (and
            # takes any study already due that this pass could not complete).
            self.scheduler.wake_at("complete-studies", when)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        self.stop_event.set()

    @property
    def _running_marker(self) -> Path:
        return self.config.storage.layout.running_marker

    def run(self) -> int:
        swept = self.spool.sweep_incoming()
        if swept:
            log.info("removed %d unacknowledged partial file(s) from the spool", swept)
        if self._running_marker.exists():
            # The last run did not stop cleanly: rows of acknowledged instances
            # may be missing (SQLite NORMAL on power loss). Rebuild them.
            log.warning("the previous run did not stop cleanly; checking the spool")
            self.receiver.recover()
        self._running_marker.touch()
        # SR/SEG files half written by a crash; the report stage writes them again.
        self.reporter.outbox.sweep_incoming()
        # A removal a crash interrupted, finished before anything is received.
        self.cleaner.sweep()
        # Every port this process will listen on, before anything listens: a port in
        # use stops the start with one line naming the part (daemon/errors.py).
        cfg = self.config
        check_port_free("DICOM receiver (SCP)", "scp.port", cfg.scp.host, cfg.scp.port)
        if cfg.web.enabled:
            check_port_free("web page", "web.port", cfg.web.host, cfg.web.port)
        if cfg.metrics.enabled:
            check_port_free("metrics endpoint", "metrics.port", cfg.metrics.host,
                            cfg.metrics.port)  # fmt: skip
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.heartbeats = [Heartbeat(self.db, "serve", cfg.worker.liveness_seconds).start()]
        if self.worker is not None:
            worker = self.worker
            # Beats only while the worker thread runs and its models loaded.
            self.heartbeats.append(Heartbeat(
                self.db, "worker", cfg.worker.liveness_seconds,
                alive=lambda: worker.live,
            ).start())  # fmt: skip
        self.scp.start()
        if self.receivers is not None:
            self.receivers.start(self.scp.listening_socket)
        # In the background: receiving starts at once, the first report is not slower.
        threading.Thread(target=_warm_up, name="report-warm-up", daemon=True).start()
        self.scheduler.start()
        self.scheduler.wake("drift")  # once at start, not an interval (an hour) later
        self.scheduler.wake("monitor")
        self.listener.start()
        if self.config.metrics.enabled:
            self.metrics_server = serve_metrics(
                self.db,
                self.config.metrics.host,
                self.config.metrics.port,
                storage=self.cleaner.storage_state,
                healthy=self.healthy,
                config=self.config,
                audit_waiting=lambda: self.receiver.backlog.waiting,
            )
        if self.config.web.enabled:
            self.web_server = serve_web(self.config, self.db, self.healthy, self.release_at)
        if self.worker is not None:
            # The models load in the worker's thread: receiving does not wait for them.
            self.worker.start()
        self.notifier.ready(f"listening on port {self.scp.port}")
        log.info("secondreader ready (AE %s, port %d)", self.config.scp.ae_title, self.scp.port)
        interval = (self.notifier.watchdog_seconds or 10.0) / 2
        while not self.stop_event.wait(interval):
            # Ping the watchdog only while the parts that do the work are alive.
            worker_ok = self.worker is None or self.worker.healthy
            if self.receivers is not None:
                self.receivers.check()  # a dead receiving process is started again
            if self.scheduler.running and self.scp.is_alive() and worker_ok:
                self.notifier.watchdog()
        return self.stop()

    def stop(self) -> int:
        self.notifier.stopping()
        if self.worker is not None:
            self.worker.request_stop()  # no new job while the associations drain
        if self.receivers is not None:
            self.receivers.request_stop()  # they drain while we do
        drained = self.scp.drain(self.config.scp.drain_seconds)
        if not drained:
            log.warning(
                "associations still running after %.0f s; closing", self.config.scp.drain_seconds
            )
        self.scp.shutdown()
        if self.receivers is not None:
            self.receivers.join(self.config.scp.drain_seconds + 5)
        self.receiver.close()
        self.listener.stop()
        self.scheduler.shutdown()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self.web_server is not None:
            self.web_server.close()
        if self.worker is not None:
            self.worker.stop(self.config.worker.stop_seconds)
        for heartbeat in self.heartbeats:
            heartbeat.stop()
        self.seal_audit()  # the last events of this run, chained before exit
        self.db.dispose()
        self._running_marker.unlink(missing_ok=True)
        log.info("secondreader stopped")
        return 0
