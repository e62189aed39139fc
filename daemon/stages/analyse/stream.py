"""Stage 4, infer, begun early: images of studies still arriving are read and run ahead.

The streamer is a thread beside the worker, in the worker's process, with
the worker's analyser (the models). It looks for instances of studies still
receiving (`db.queue.arriving_instances`), oldest first past what it has
seen, and hands their spool files to the analyser's read-ahead
(`model/stream.py`): each image is decoded, preprocessed and run through the
2D models it fits. When the study completes, its job (on this worker) finds
most of the work done, and the analysis does only the last few images.

It never reports anything: a partial study is never a result. A crash loses
only the memo; the job reads the files, as without streaming. Instances a
receiver commits out of id order (several PostgreSQL writers) may be missed
here; they are then read at completion. A job that runs on another worker
does not find this memo: it is forgotten after `worker.stream_forget_seconds`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Protocol, runtime_checkable

from daemon.config import WorkerConfig
from db import queue
from db.session import Database

log = logging.getLogger(__name__)

# Images handed to the analyser at a time: small enough that a study that
# completes meanwhile waits little for the model (the job goes first).
CHUNK = 8


@runtime_checkable
class ReadsAhead(Protocol):
    """An analyser that can prepare the images of a study still arriving."""

    def prepare(self, study_instance_uid: str, paths: list[Path]) -> int: ...

    def forget_idle(self, seconds: float) -> list[str]: ...


class Streamer:
    def __init__(
        self, db: Database, analyser: ReadsAhead, settings: WorkerConfig, *, spool_dir: Path
    ) -> None:
        self.db = db
        self.analyser = analyser
        self.settings = settings
        self.spool_dir = spool_dir
        self._after_id = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.prepared = 0  # images prepared ahead since start
        self._announced: dict[str, None] = {}  # studies said in the log (bounded)

    def start(self) -> Streamer:
        self._thread = threading.Thread(target=self._loop, name="streamer", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        """An instance was received: look now rather than after the poll interval."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)

    def _loop(self) -> None:
        next_forget = time.monotonic() + self.settings.stream_forget_seconds
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception:
                # The database is down, or similar: streaming is only a head
                # start, so wait and try again; the job will read the files.
                log.exception("streamer error")
                busy = False
            if time.monotonic() >= next_forget:
                next_forget = time.monotonic() + self.settings.stream_forget_seconds
                for uid in self.analyser.forget_idle(self.settings.stream_forget_seconds):
                    log.debug("read-ahead of study %s forgotten (idle)", uid)
            if not busy:
                self._wake.wait(self.settings.stream_poll_seconds)
                self._wake.clear()

    def run_once(self) -> bool:
        """Prepare the instances that arrived since the last call; False when none had."""
        with self.db.session() as s:
            rows = queue.arriving_instances(s, after_id=self._after_id)
        if not rows:
            return False
        by_study: dict[str, list[Path]] = defaultdict(list)
        for row in rows:
            by_study[row.study_instance_uid].append(self.spool_dir / row.path)
        for study_uid, paths in by_study.items():
            for start in range(0, len(paths), CHUNK):
                if self._stop.is_set():
                    return False
                done = self.analyser.prepare(study_uid, paths[start : start + CHUNK])
                self.prepared += done
                if done and study_uid not in self._announced:
                    log.info("study %s: analysing its images as they arrive", study_uid)
                    self._announced[study_uid] = None
                    if len(self._announced) > 1000:
                        self._announced.pop(next(iter(self._announced)))
        self._after_id = rows[-1].instance_id
        return True
