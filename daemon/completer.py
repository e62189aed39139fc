"""Stage 2, complete: a study quiet for `stable_seconds` becomes one queued job."""

from __future__ import annotations

import logging

from db.session import Database
from db.studies import CompletedStudy, complete_stable_studies

log = logging.getLogger(__name__)


class Completer:
    def __init__(self, db: Database, stable_seconds: float, max_seconds: float) -> None:
        self.db = db
        self.stable_seconds = stable_seconds
        self.max_seconds = max_seconds

    def run_once(self) -> list[CompletedStudy]:
        with self.db.session() as s:
            done = complete_stable_studies(
                s, stable_seconds=self.stable_seconds, max_seconds=self.max_seconds
            )
        for c in done:
            log.info(
                "study %s complete%s; job %d queued",
                c.study_instance_uid,
                " (forced: still receiving at the time limit)" if c.forced else "",
                c.job_id,
            )
        return done
