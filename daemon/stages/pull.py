"""Scheduled pull: C-FIND the PACS for new studies and C-MOVE them to us.

Each poll (an APScheduler job, `pull.interval_seconds`) asks the PACS for
the studies of the last `max_age_days` days that match the filters, and
C-MOVEs those it never pulled (db/pulls.py) to our AE. The PACS then sends
them to our SCP like any modality: they take the receive path, complete and
are analysed as usual. A failed C-MOVE is asked for again at the next poll,
up to `max_attempts`. No patient attribute is queried, logged or kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, timedelta

from daemon.config import Config
from db.pulls import record_move, record_poll, to_pull
from db.session import Database
from dicom_io.query import find_studies, move_study
from dicom_io.scu import RemoteAE
from dicom_io.text import safe_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PollReport:
    matches: int
    moved: list[str]
    failed: list[str]


class Puller:
    def __init__(self, db: Database, config: Config) -> None:
        self.db = db
        self.cfg = config.pull
        self.remote = RemoteAE(
            ae_title=self.cfg.ae_title,
            host=self.cfg.host,
            port=self.cfg.port,
            calling_ae_title=config.scp.ae_title,
            timeout=self.cfg.timeout_seconds,
        )
        self.destination = self.cfg.move_destination or config.scp.ae_title

    def date_range(self, today: date | None = None) -> str:
        today = today or date.today()
        first = today - timedelta(days=self.cfg.max_age_days)
        return f"{first:%Y%m%d}-{today:%Y%m%d}"

    def run_once(self) -> PollReport:
        uids: list[str] = []
        for modality in self.cfg.modalities or [""]:
            matches = find_studies(
                self.remote,
                study_date=self.date_range(),
                modality=modality,
                study_description=self.cfg.study_description,
            )
            uids += [m.study_instance_uid for m in matches]
        with self.db.session() as s:
            wanted = to_pull(s, uids, self.remote.ae_title)
            record_poll(s, self.remote.ae_title, matches=len(set(uids)), new=len(wanted))
        moved, failed = [], []
        for uid in wanted[: self.cfg.max_studies_per_poll]:
            status, error, detail = None, None, {}
            try:
                result = move_study(self.remote, uid, self.destination)
                status, ok = result.status, result.ok
                detail = {"completed": result.completed, "failed": result.failed}
                if not ok:
                    error = f"C-MOVE status 0x{result.status:04X}, {result.failed} failed"
            except Exception as exc:
                ok, error = False, safe_error(exc)
            with self.db.session() as s:
                state = record_move(
                    s, uid, ok=ok, status=status, error=error,
                    max_attempts=self.cfg.max_attempts, detail=detail,
                )  # fmt: skip
            if ok:
                moved.append(uid)
                log.info("pulled study %s from %s", uid, self.remote.ae_title)
            else:
                failed.append(uid)
                log.warning("pull of study %s from %s failed (%s): %s",
                            uid, self.remote.ae_title, state, error)  # fmt: skip
        return PollReport(len(set(uids)), moved, failed)
