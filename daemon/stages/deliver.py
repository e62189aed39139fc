"""Stage 6, deliver: outbox rows to the PACS by C-STORE, with retries that survive restarts.

Each tick takes the due rows and sends them, one association per
destination, with exactly the presentation contexts of the files sent
(dicom_io/scu.py); a class the PACS refuses fails alone. A stored object is done, or,
for a destination with storage commitment, done once the PACS reports it
committed. A failure counts an attempt and backs off exponentially; an
object still undelivered `dead_letter_after_seconds` after it was queued
becomes a dead letter, logged at WARNING, counted by `secondreader status`
and re-queued by `secondreader deliveries retry`.

Exactly once, as far as the PACS can tell: a DONE row is never sent again.
A crash between a successful C-STORE and the database update sends the
object again after the restart with the same SOP Instance UID, which a PACS
treats as the same instance (stored once, or replaced by identical data).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import cast

from daemon.config import Config, Destination
from daemon.factories import destination_remote
from db.models import utcnow
from db.outbox import (
    Commitment,
    OutboxView,
    RetryPolicy,
    due_items,
    items_in_transaction,
    mark_commitment_requested,
    mark_committed,
    mark_done,
    record_failure,
)
from db.session import Database
from dicom_io.commitment import (
    CommitmentReport,
    failure_text,
    new_transaction_uid,
    request_commitment,
)
from dicom_io.scu import AssociationFailed, RemoteAE, SendResult, send
from dicom_io.status import status_words

log = logging.getLogger(__name__)


def status_text(status: int | None) -> str:
    if status is None:
        # `send` cannot tell these apart yet; its log line at WARNING says which.
        return (
            "not stored, no C-STORE response: the peer refused the SOP class or "
            "transfer syntax, or the association was lost"
        )
    # In pynetdicom's words (its status tables), so that a dead letter says why.
    words = status_words(status)
    return f"C-STORE status 0x{status:04X}" + (f" ({words})" if words else "")


@dataclass
class TickSummary:
    done: int = 0
    commitment_requested: int = 0
    failed: int = 0
    dead: list[int] = field(default_factory=list)


class Dispatcher:
    def __init__(self, db: Database, config: Config) -> None:
        self.db = db
        self.config = config
        self.settings = config.delivery
        self.destinations = {d.name: d for d in config.delivery.destinations}
        self.policy = RetryPolicy(
            base_seconds=self.settings.retry_base_seconds,
            max_seconds=self.settings.retry_max_seconds,
            dead_after_seconds=self.settings.dead_letter_after_seconds,
        )
        allowed = {p.ae_title for p in config.scp.allowed_peers}
        for dest in self.destinations.values():
            if dest.storage_commitment and allowed and dest.ae_title not in allowed:
                # The report comes on an association the PACS opens to our SCP.
                log.warning(
                    "destination %s asks for storage commitment, but scp.allowed_peers does "
                    "not admit its AE %s: its reports will be refused",
                    dest.name,
                    dest.ae_title,
                )

    @property
    def wants_commitment(self) -> bool:
        return any(d.storage_commitment for d in self.destinations.values())

    def remote(self, dest: Destination) -> RemoteAE:
        return destination_remote(self.config, dest)

    # -- one tick ------------------------------------------------------------
    def run_once(self) -> TickSummary:
        summary = TickSummary()
        now = utcnow()
        with self.db.session() as s:
            due = due_items(s, now, limit=self.settings.batch_size)
        late = [i for i in due if i.commitment_state == Commitment.REQUESTED]
        if late:
            timeout = self.settings.commitment_timeout_seconds
            self._failed(
                late,
                None,
                f"no storage commitment report within {timeout:g} s",
                summary,
                count_attempt=False,
                commitment=Commitment.FAILED,  # sent and requested again after the backoff
            )
        for dest_name, items in self._groups(
            [i for i in due if i.commitment_state != Commitment.REQUESTED]
        ):
            dest = self.destinations.get(dest_name)
            if dest is None:
                self._failed(items, None, f"destination {dest_name!r} is not configured", summary)
                continue
            self._deliver(dest, items, summary)
        return summary

    @staticmethod
    def _groups(items: list[OutboxView]) -> list[tuple[str, list[OutboxView]]]:
        """Items by destination, in queue order (a SEG before the SR that cites it)."""
        groups: dict[str, list[OutboxView]] = defaultdict(list)
        for item in items:
            groups[item.destination].append(item)
        return sorted(groups.items(), key=lambda kv: kv[1][0].id)

    def _deliver(self, dest: Destination, items: list[OutboxView], summary: TickSummary) -> None:
        state_dir = self.config.storage.state_dir
        missing = [i for i in items if not (state_dir / i.path).is_file()]
        if missing:
            self._failed(missing, None, "file missing from the outbox folder", summary)
            items = [i for i in items if i not in missing]
            if not items:
                return
        by_path = {state_dir / i.path: i for i in items}
        try:
            results = send(list(by_path), self.remote(dest))
        except (AssociationFailed, OSError, ValueError, RuntimeError) as exc:
            # AssociationFailed also when the peer accepted none of our
            # presentation contexts (every class refused): pynetdicom aborts.
            self._failed(items, None, f"{type(exc).__name__}: {exc}", summary)
            return
        outcome: dict[int, SendResult] = {by_path[r.path].id: r for r in results}
        stored = [i for i in items if i.id in outcome and outcome[i.id].ok]
        refused: dict[tuple[int | None, str], list[OutboxView]] = defaultdict(list)
        for item in items:
            if item not in stored:
                r = outcome.get(item.id)
                status = r.status if r is not None else None
                why = (r.error if r is not None else None) or status_text(status)
                refused[(status, why)].append(item)
        for (status, why), failed in refused.items():
            self._failed(failed, status, why, summary)
        if not stored:
            return
        if dest.storage_commitment:
            self._request_commitment(dest, stored, outcome, summary)
            return
        now = utcnow()
        with self.db.session() as s:
            for item in stored:
                status = int(cast(int, outcome[item.id].status))
                summary.done += mark_done(s, item, status=status, now=now)
        log.info("delivered %d object(s) to %s", len(stored), dest.name)

    def _request_commitment(
        self,
        dest: Destination,
        stored: list[OutboxView],
        outcome: dict[int, SendResult],
        summary: TickSummary,
    ) -> None:
        txn = new_transaction_uid()
        deadline = utcnow() + timedelta(seconds=self.settings.commitment_timeout_seconds)
        # Recorded before the request goes out, so an immediate report finds it.
        with self.db.session() as s:
            mark_commitment_requested(
                s,
                stored,
                statuses={i.id: int(cast(int, outcome[i.id].status)) for i in stored},
                transaction_uid=txn,
                deadline=deadline,
            )
        refs = [(i.sop_class_uid, i.sop_instance_uid) for i in stored]
        try:
            status = request_commitment(self.remote(dest), txn, refs)
            error = None if status == 0 else f"N-ACTION status 0x{status:04X}"
        except (AssociationFailed, OSError, RuntimeError) as exc:
            error = f"storage commitment request failed: {exc}"
        if error is not None:
            # The attempt was counted with the request: do not count it twice.
            self._failed(
                stored, None, error, summary, count_attempt=False, commitment=Commitment.FAILED
            )
            return
        summary.commitment_requested += len(stored)
        log.info(
            "stored %d object(s) at %s; storage commitment %s requested",
            len(stored),
            dest.name,
            txn,
        )

    def _failed(
        self,
        items: list[OutboxView],
        status: int | None,
        error: str,
        summary: TickSummary,
        *,
        count_attempt: bool = True,
        commitment: str | None = None,
    ) -> None:
        now = utcnow()
        outcomes = []
        with self.db.session() as s:
            for item in items:
                outcomes.append(
                    (
                        item,
                        record_failure(
                            s,
                            item,
                            status=status,
                            error=error,
                            policy=self.policy,
                            now=now,
                            count_attempt=count_attempt,
                            commitment_state=commitment,
                        ),
                    )
                )
        for item, result in outcomes:
            if result is None:
                continue
            summary.failed += 1
            if result.dead:
                summary.dead.append(item.id)
                log.warning(
                    "dead letter: %s %s to %s not delivered after %d attempt(s) since %s: %s "
                    "(`secondreader deliveries retry` re-queues it)",
                    item.object_kind.upper(),
                    item.sop_instance_uid,
                    item.destination,
                    result.attempts,
                    _iso(item.created_at),
                    error,
                )
        live = [r for _i, r in outcomes if r is not None and not r.dead]
        if live:
            log.warning(
                "delivery of %d object(s) to %s failed (%s); next attempt in %.1f s",
                len(live),
                items[0].destination,
                error,
                (min(r.next_attempt_at for r in live) - now).total_seconds(),
            )

    # -- storage commitment reports (called from the SCP's thread) ------------
    def on_commitment(self, report: CommitmentReport) -> None:
        now = utcnow()
        failed_reasons = dict(report.failed)
        with self.db.session() as s:
            items = items_in_transaction(s, report.transaction_uid)
            if not items:
                log.warning(
                    "storage commitment report from %s for unknown or settled transaction %s",
                    report.calling_ae,
                    report.transaction_uid,
                )
                return
            committed = set(report.committed)
            done = 0
            failed: list[OutboxView] = []
            for item in items:
                if item.sop_instance_uid in committed:
                    done += mark_committed(s, item, now)
                elif item.sop_instance_uid in failed_reasons:
                    failed.append(item)
        for item in failed:
            self._failed(
                [item],
                failed_reasons[item.sop_instance_uid],
                failure_text(failed_reasons[item.sop_instance_uid]),
                TickSummary(),
                count_attempt=False,
                commitment=Commitment.FAILED,
            )
        log.info(
            "storage commitment %s from %s: %d committed, %d failed",
            report.transaction_uid,
            report.calling_ae,
            done,
            len(failed),
        )


def _iso(value: datetime) -> str:
    return value.replace(microsecond=0).isoformat() + "Z"
