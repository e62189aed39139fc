"""Retention: the files of finished studies go, by age and when the disk fills.

`Cleaner.run_once` is the daemon's scheduled job and `secondreader cleanup`:

1. by age, inside the off-peak window: finished studies (db/retention.py)
   whose last result is older than `keep_days`;
2. by disk: above the high watermark, finished studies oldest first, any
   age, until below the low watermark. When nothing may be removed and the
   disk is still above it, that is logged as an error on every pass, shown
   by `status` and exported as a metric; receiving goes on until the disk is
   really full, then answers C-STORE with 0xA700 (out of resources).

Removal is safe against a late instance of the same study. The removal is
recorded first, conditional on the study being unchanged since it was
chosen (db/retention.mark_files_removed); then each file is moved into
<state>/trash and compared with what was seen before the record: a newer
copy (the same instance sent again meanwhile) goes straight back. A crash
after the record leaves files the next start sweeps (`sweep`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from pathlib import Path

from daemon.config import Config
from db.layout import StateLayout
from db.models import utcnow
from db.retention import (
    FinishedStudy,
    StudyFiles,
    finished_studies,
    mark_files_removed,
    record_removal,
    removed_studies,
    study_files,
)
from db.session import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiskUsage:
    total: int
    used: int

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.total if self.total else 0.0


def disk_usage(path: Path) -> DiskUsage:
    usage = shutil.disk_usage(path)
    return DiskUsage(usage.total, usage.total - usage.free)


@dataclass(frozen=True)
class RemovedStudy:
    study_instance_uid: str
    reason: str  # "age" or "watermark"
    files: int
    size_bytes: int


@dataclass
class CleanupReport:
    disk_before: DiskUsage
    disk_after: DiskUsage
    removed: list[RemovedStudy] = field(default_factory=list)
    # Above the high watermark with nothing that may be removed.
    blocked: bool = False
    in_window: bool = True


class Cleaner:
    def __init__(
        self,
        db: Database,
        config: Config,
        *,
        usage: Callable[[Path], DiskUsage] = disk_usage,
        clock: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.db = db
        self.config = config
        self.cfg = config.retention
        self.state_dir = config.storage.state_dir
        self.trash = StateLayout(self.state_dir).trash
        self._usage = usage
        self._clock = clock  # local time, for the off-peak window

    def disk(self) -> DiskUsage:
        return self._usage(self.state_dir)

    def storage_state(self) -> dict[str, float | bool]:
        """The disk and whether retention is stuck, for `status` and the metrics."""
        usage = self.disk()
        high = self.cfg.high_watermark_percent
        blocked = usage.percent >= high and not self._finished(limit=1)
        return {
            "used_percent": round(usage.percent, 2),
            "high_watermark_percent": high,
            "blocked": blocked,
        }

    def in_window(self) -> bool:
        if self.cfg.window_start is None or self.cfg.window_end is None:
            return True
        start, end = (
            time.fromisoformat(self.cfg.window_start),
            time.fromisoformat(self.cfg.window_end),
        )
        now = self._clock().time()
        return start <= now < end if start <= end else now >= start or now < end

    def run_once(self, dry_run: bool = False) -> CleanupReport:
        before = self.disk()
        report = CleanupReport(disk_before=before, disk_after=before, in_window=self.in_window())
        # What a dry run would free, so that its watermark pass stops where a real one would.
        freed = 0
        if report.in_window:
            cutoff = utcnow() - timedelta(days=self.cfg.keep_days)
            for study in self._finished(completed_before=cutoff):
                if study.finished_at >= cutoff:
                    continue
                removed = self._remove_study(study, "age", dry_run)
                if removed is not None:
                    report.removed.append(removed)
                    freed += removed.size_bytes
        usage = self._after(freed, dry_run)
        if usage.percent >= self.cfg.high_watermark_percent:
            done = {r.study_instance_uid for r in report.removed}
            for study in self._finished():
                if usage.percent <= self.cfg.low_watermark_percent:
                    break
                if study.study_instance_uid in done:
                    continue
                removed = self._remove_study(study, "watermark", dry_run)
                if removed is not None:
                    report.removed.append(removed)
                    freed += removed.size_bytes
                    usage = self._after(freed, dry_run)
            if usage.percent >= self.cfg.high_watermark_percent:
                report.blocked = True
                log.error(
                    "disk of %s is %.1f %% full (high watermark %.0f %%) and no finished study "
                    "is left to remove: studies still in the pipeline hold the rest",
                    self.state_dir, usage.percent, self.cfg.high_watermark_percent,
                )  # fmt: skip
        report.disk_after = usage
        if report.removed and not dry_run:
            log.info(
                "retention: files of %d study(ies) removed, %.1f MB freed; disk %.1f %% used",
                len(report.removed), freed / 1e6, usage.percent,
            )  # fmt: skip
        return report

    def _after(self, freed: int, dry_run: bool) -> DiskUsage:
        usage = self.disk()
        return DiskUsage(usage.total, max(0, usage.used - freed)) if dry_run else usage

    def _finished(
        self, completed_before: datetime | None = None, limit: int = 1000
    ) -> list[FinishedStudy]:
        with self.db.session() as s:
            return finished_studies(
                s,
                completed_before=completed_before,
                wait_for_review=self.cfg.wait_for_review,
                limit=limit,
            )

    def _paths(self, files: StudyFiles) -> list[Path]:
        return [
            *(self.config.storage.spool_dir / p for p in files.spool),
            *(self.state_dir / p for p in files.state),
            *(self.config.storage.ancillary_dir / p for p in files.ancillary),
        ]

    def _remove_study(
        self, study: FinishedStudy, reason: str, dry_run: bool
    ) -> RemovedStudy | None:
        with self.db.session() as s:
            paths = self._paths(study_files(s, study.study_id))
        # What is there before the removal is recorded: anything written
        # after the record is newer than this and is kept (module docstring).
        seen = {}
        for path in paths:
            try:
                seen[path] = path.stat()
            except FileNotFoundError:
                continue
        size = sum(st.st_size for st in seen.values())
        removed = RemovedStudy(study.study_instance_uid, reason, len(seen), size)
        if dry_run:
            return removed
        with self.db.session() as s:
            if not mark_files_removed(s, study):
                log.info("retention: study %s changed meanwhile; kept", study.study_instance_uid)
                return None
            record_removal(s, study, files=len(seen), size_bytes=size, reason=reason)
        for path, st in seen.items():
            self._remove(path, st)
        self._prune_folders(paths)
        return removed

    def _remove(self, path: Path, seen: os.stat_result | None) -> None:
        # Parked under its own relative path, so that a crash between the move
        # and the decision leaves a file `sweep` can put back.
        parked_root = self.trash / uuid.uuid4().hex
        parked = parked_root / path.relative_to(self.state_dir)
        parked.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, parked)
        except FileNotFoundError:
            shutil.rmtree(parked_root, ignore_errors=True)
            return
        now = parked.stat()
        if seen is not None and (now.st_ino, now.st_mtime_ns) != (seen.st_ino, seen.st_mtime_ns):
            # A newer copy arrived after the study was chosen: it stays.
            with contextlib.suppress(FileExistsError):  # an even newer one is in place
                os.link(parked, path)
        shutil.rmtree(parked_root, ignore_errors=True)
        with contextlib.suppress(OSError):  # left while another removal parks there
            self.trash.rmdir()

    def _prune_folders(self, paths: list[Path]) -> None:
        """Remove the folders the files left empty (series, then study), never a root."""
        roots = {
            self.state_dir,
            self.config.storage.spool_dir,
            self.config.storage.ancillary_dir,
            StateLayout(self.state_dir).saliency,
            StateLayout(self.state_dir).outbox,
        }
        for folder in sorted({p.parent for p in paths}, key=lambda p: -len(p.parts)):
            while folder not in roots and folder.is_relative_to(self.state_dir):
                try:
                    folder.rmdir()
                except OSError:
                    break  # not empty (or gone): leave it
                folder = folder.parent

    def sweep(self, days: float = 7.0) -> int:
        """Finish what a crash interrupted; run before the SCP starts.

        Files left parked in the trash go back where they were (a newer copy
        may be among them), then the files of studies recorded as removed in
        the last `days` are removed. Returns how many files it removed.
        """
        self._restore_parked()
        count = 0
        with self.db.session() as s:
            studies = removed_studies(s, since=utcnow() - timedelta(days=days))
        for study_id, removed_at in studies:
            with self.db.session() as s:
                paths = self._paths(study_files(s, study_id, up_to=removed_at))
            left = [p for p in paths if p.exists()]
            for path in left:
                self._remove(path, None)
            if left:
                self._prune_folders(left)
                count += len(left)
        if count:
            log.warning("retention: removed %d file(s) an interrupted cleanup left", count)
        return count

    def _restore_parked(self) -> None:
        if not self.trash.exists():
            return
        for parked_root in self.trash.iterdir():
            for parked in (p for p in parked_root.rglob("*") if p.is_file()):
                original = self.state_dir / parked.relative_to(parked_root)
                original.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.link(parked, original)
        shutil.rmtree(self.trash, ignore_errors=True)
