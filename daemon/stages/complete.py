"""Stage 2, complete: a study becomes one queued job when it is whole.

Whole means: the modality's MPPS said COMPLETED and every instance it lists
has arrived (at once, no waiting), or else nothing arrived for
`stable_seconds` (the quiet window), or it has been receiving for
`max_seconds`.
"""

from __future__ import annotations

import logging
from datetime import datetime

from db.session import Database
from db.studies import (
    CompletedStudy,
    complete_by_mpps,
    complete_stable_studies,
    next_stable_due,
)

log = logging.getLogger(__name__)


class Completer:
    def __init__(self, db: Database, stable_seconds: float, max_seconds: float) -> None:
        self.db = db
        self.stable_seconds = stable_seconds
        self.max_seconds = max_seconds

    def run_once(self) -> list[CompletedStudy]:
        with self.db.session() as s:
            by_mpps = complete_by_mpps(s)
        with self.db.session() as s:
            done = complete_stable_studies(
                s, stable_seconds=self.stable_seconds, max_seconds=self.max_seconds
            )
        for c in by_mpps:
            log.info(
                "study %s complete (MPPS: every listed instance arrived); job %d queued",
                c.study_instance_uid, c.job_id,
            )  # fmt: skip
        for c in done:
            log.info(
                "study %s complete%s; job %d queued",
                c.study_instance_uid,
                " (forced: still receiving at the time limit)" if c.forced else "",
                c.job_id,
            )
        return [*by_mpps, *done]

    def next_due(self) -> datetime | None:
        """When a receiving study's quiet window (or time limit) ends next; naive UTC."""
        with self.db.session() as s:
            return next_stable_due(
                s, stable_seconds=self.stable_seconds, max_seconds=self.max_seconds
            )
