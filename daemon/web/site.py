"""What the web page's views share: the services, and two caches behind locks.

waitress serves requests on several threads; the caches (a run's series in
slice order, the study's header as the AI SR carries it) are read by all of
them, so each sits behind its own lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from flask import current_app
from pydicom import dcmread

from daemon.accounts import AccountService
from daemon.config import Config
from daemon.stages.monitor.governance import GovernanceService
from daemon.stages.review import ReviewService
from daemon.web.images import SeriesImage, in_slice_order
from db.reviews import series_images
from db.session import Database

_STUDY_TAGS = ["PatientName", "PatientID", "AccessionNumber", "StudyDescription", "StudyDate"]
_CACHED_RUNS = 32


@dataclass(frozen=True)
class StudyInfo:
    """The study as the PACS shows it, from the AI SR's header (logged-in users only)."""

    patient_name: str = ""
    patient_id: str = ""
    accession_number: str = ""
    study_description: str = ""
    study_date: str = ""  # YYYY-MM-DD


@dataclass
class Site:
    config: Config
    db: Database
    accounts: AccountService
    reviews: ReviewService
    # Called with the time a held verified SR is due (serve wakes its finalizer then).
    on_signed: Callable[[datetime | None], None] = lambda _due: None
    _series: dict[int, list[SeriesImage]] = field(default_factory=dict)
    _series_lock: threading.Lock = field(default_factory=threading.Lock)
    _studies: dict[str, StudyInfo] = field(default_factory=dict)
    _studies_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def governance(self) -> GovernanceService:
        return GovernanceService(self.db, self.config)

    def series(self, run_id: int) -> list[SeriesImage]:
        """The run's analysed series in slice order (read once per run)."""
        with self._series_lock:
            cached = self._series.get(run_id)
        if cached is not None:
            return cached
        with self.db.session() as s:
            rows, _ = series_images(s, run_id)
        images = [SeriesImage(uid, self.config.storage.spool_dir / p) for uid, p in rows]
        ordered = in_slice_order([i for i in images if i.path.exists()])  # retention may have run
        with self._series_lock:
            if len(self._series) >= _CACHED_RUNS:
                self._series.clear()
            self._series[run_id] = ordered
        return ordered

    def ai_sr_path(self, study_uid: str, sr_uid: str) -> Path:
        # The report stage's layout, as the review service reads it: <outbox>/<study>/<UID>.dcm.
        return self.reviews.outbox.root / study_uid / f"{sr_uid}.dcm"

    def study(self, study_uid: str, sr_uid: str | None) -> StudyInfo:
        """Patient, accession, description and date as the AI SR carries them."""
        if sr_uid is None:
            return StudyInfo()
        with self._studies_lock:
            cached = self._studies.get(sr_uid)
        if cached is not None:
            return cached
        try:
            ds = dcmread(
                self.ai_sr_path(study_uid, sr_uid), stop_before_pixels=True,
                specific_tags=_STUDY_TAGS,
            )  # fmt: skip
        except (OSError, ValueError):
            return StudyInfo()  # its file is gone (retention): not cached, may come back
        date = str(ds.get("StudyDate", "") or "")
        info = StudyInfo(
            patient_name=str(ds.get("PatientName", "") or ""),
            patient_id=str(ds.get("PatientID", "") or ""),
            accession_number=str(ds.get("AccessionNumber", "") or ""),
            study_description=str(ds.get("StudyDescription", "") or ""),
            study_date=f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 else date,
        )
        with self._studies_lock:
            if len(self._studies) >= 4096:
                self._studies.clear()
            self._studies[sr_uid] = info
        return info


def site() -> Site:
    """The current app's Site."""
    found: Any = current_app.extensions["secondreader"]
    return found
