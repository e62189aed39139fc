"""Stage 1, receive: a C-STORE'd object goes to the spool, then into the database.

Success is answered only after both: the file is durably on disk and its row
is committed. Anything else answers a failure status and keeps nothing
half-done that could be mistaken for an accepted instance.

The spool file is the durable record (fsynced, file and folder); the row is
committed with SQLite's synchronous=NORMAL by default, which survives a
process crash but may lose the last commits on power loss. `recover` puts
those rows back from the spool after an unclean stop, so an acknowledged
instance is never lost either way.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from daemon.stages.receive.audit_backlog import AuditBacklog
from db import audit
from db.audit import EventType
from db.ingest import (
    StoredInstance,
    UIDConflict,
    is_own_object,
    known_instance_paths,
    record_ancillary,
    record_instance,
)
from db.mpps import record_message, waiting_studies
from db.session import Database, DeadlineExceeded
from dicom_io import mpps, status
from dicom_io.identify import (
    Identity,
    InvalidDataset,
    identify,
    identify_received,
    read_transfer_syntax,
    valid_uid,
)
from dicom_io.scp import AssociationOutcome, ReceivedObject
from dicom_io.sopclasses import OWN_IMAGE_CLASSES, is_image_storage
from dicom_io.spool import Spool
from dicom_io.text import printable

# 0xA900 is "Data Set does not match SOP Class"; PS3.4 B.2.3 gives the
# A9xx range to such refusals. A reused UID is a refusal of that kind, and
# permanent: the sender must not simply retry.
STATUS_UID_CONFLICT = status.DATASET_MISMATCH

# Seconds an audit row of the receive path may wait for the database before
# it is queued instead (daemon/stages/receive/audit_backlog.py): the answer to the peer waits.
_AUDIT_BUDGET = 0.5

_OUTCOME_EVENTS = {
    "accepted": EventType.ASSOCIATION_ACCEPTED,
    "rejected": EventType.ASSOCIATION_REJECTED,
    "aborted": EventType.ASSOCIATION_ABORTED,
    "released": EventType.ASSOCIATION_RELEASED,
}

log = logging.getLogger(__name__)


class Receiver:
    def __init__(
        self,
        db: Database,
        spool: Spool,
        max_associations: int = 10,
        *,
        ancillary: Spool | None = None,
        others_busy: Callable[[], bool] | None = None,
        store_deadline: float = 10.0,
    ) -> None:
        """`ancillary` keeps non-image objects; None drops them (answered with success).

        `others_busy`: whether another receiving process, writing to the same
        database, holds a connection now (`scp.processes` > 1; see `_record`).
        `store_deadline`: seconds from a C-STORE-RQ to its answer when the
        database is slow (scp.store_deadline_seconds): past it, 0xA700.
        """
        self.db = db
        self.store_deadline = store_deadline
        # Refusals and association outcomes: audited without waiting (see the module).
        self.backlog = AuditBacklog(db)
        self.spool = spool
        self.ancillary = ancillary
        self.others_busy = others_busy
        # Stores in progress in this process (see `_store`: the file first when > 1).
        self._in_flight = 0
        self._count_lock = threading.Lock()
        # Studies a COMPLETED MPPS waits on: an instance of one of them wakes
        # the completer (`on_ready`), so the study completes as soon as the
        # last listed instance is in. Refreshed from the database on each MPPS.
        with db.session() as s:
            self._mpps_waiting: set[str] = waiting_studies(s)
        self.on_ready: Callable[[], None] | None = None
        # Called after each stored instance: the streamer's wake-up (an
        # in-process worker reads the image ahead of completion).
        self.on_stored: Callable[[], None] | None = None
        # One spool writer per concurrent association at most.
        self._io = ThreadPoolExecutor(max_associations, thread_name_prefix="spool")

    def close(self) -> None:
        self._io.shutdown(wait=True)
        self.backlog.close()

    def on_association(self, outcome: AssociationOutcome) -> None:
        detail: dict[str, Any] = {}
        if outcome.count > 1:
            detail["count"] = outcome.count
        self.backlog.record(
            _OUTCOME_EVENTS[outcome.kind],
            outcome.calling_ae or "(unidentified)",
            budget=_AUDIT_BUDGET,
            address=outcome.address,
            reason=outcome.reason,
            association=outcome.association_id,
            **detail,
        )

    def _refuse(
        self,
        obj: ReceivedObject,
        code: int,
        why: str,
        deadline: float | None = None,
        **detail: object,
    ) -> int:
        """Log and audit a refusal; the status. The audit row waits until `deadline` at most."""
        # One line, no traceback: `why` is ours and quotes no dataset value.
        uid_ok = valid_uid(obj.sop_instance_uid)
        log.warning(
            "refused SOP instance %s from %s: %s (status 0x%04X)",
            obj.sop_instance_uid if uid_ok else "(invalid UID)",
            obj.calling_ae,
            why,
            code,
        )
        if not uid_ok and obj.sop_instance_uid:
            # Which request it was, as far as it can be told: the sent text, cut.
            detail["request_uid"] = obj.sop_instance_uid[:80]
        budget = _AUDIT_BUDGET if deadline is None else deadline - time.monotonic()
        self.backlog.record(
            EventType.INSTANCE_FAILED,
            obj.calling_ae,
            budget=min(_AUDIT_BUDGET, budget),
            # The C-STORE request's UID, when it is one: says which instance it was.
            sop_instance_uid=obj.sop_instance_uid if uid_ok else None,
            status=code,
            reason=why,
            association=obj.association_id,
            **detail,
        )
        return code

    def on_refused(self, obj: ReceivedObject, code: int, why: str) -> None:
        """A C-STORE-RQ the SCP refused before `on_store` (dicom_io/scp.py): audited.

        Called from a network thread (the DUL's): the row is queued, never
        waited for (a deadline already past).
        """
        self._refuse(obj, code, why, deadline=0.0)

    def on_store(self, obj: ReceivedObject) -> int:
        """The C-STORE status for one object; never raises (every refusal is audited)."""
        try:
            # The audit row of a refusal may take its budget after the deadline.
            budget = max(0.1, self.store_deadline - _AUDIT_BUDGET)
            return self._store(obj, time.monotonic() + budget)
        except Exception as exc:
            log.debug("store traceback", exc_info=exc)
            return self._refuse(
                obj, status.OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}"
            )

    def _store(self, obj: ReceivedObject, deadline: float) -> int:
        try:
            # The framing first: it refuses hostile nesting and unknown VRs
            # before a recursive parser sees them.
            ident = identify_received(obj.dataset, obj.transfer_syntax_uid, obj.file_bytes)
        except InvalidDataset as exc:
            return self._refuse(obj, exc.status, str(exc))
        if (
            ident.sop_instance_uid != obj.sop_instance_uid
            or ident.sop_class_uid != obj.sop_class_uid
        ):
            return self._refuse(
                obj, status.DATASET_MISMATCH, "dataset UIDs differ from the C-STORE request"
            )
        # Loop guard: our SR, SEG, map, GSPS or summary image routed back by
        # the PACS must never re-open its study; nor may any non-image object.
        image = is_image_storage(ident.sop_class_uid)
        if not image or ident.sop_class_uid in OWN_IMAGE_CLASSES:
            with self.db.session() as s:
                own = is_own_object(s, ident.sop_instance_uid)
            if own or not image:
                reason = "own object" if own else "non-image"
                return self._store_ancillary(obj, ident, reason, deadline)

        item = self._item(obj, ident)
        relative = item.path
        # The file's write and fsyncs run while the row's statements run; the
        # commit waits for the file. Both are milliseconds of waiting on the
        # disk, and over one association they are the whole per-object cost.
        written = self._io.submit(self.spool.write, relative, obj.file_bytes)
        with self._count_lock:
            self._in_flight += 1
            alone = self._in_flight == 1
        if alone and self.others_busy is not None:
            alone = not self.others_busy()
        try:
            return self._record(obj, ident, item, written, alone, deadline)
        finally:
            with self._count_lock:
                self._in_flight -= 1

    def _record(
        self,
        obj: ReceivedObject,
        ident: Identity,
        item: StoredInstance,
        written: Future[int],
        alone: bool,
        deadline: float,
    ) -> int:
        """The row, committed once the file is durable; the C-STORE status."""
        relative = item.path
        try:
            if not alone:
                # Others store too, in this process or another: the database's
                # write lock must not be held while this file is fsynced, or
                # every store waits for every fsync in turn. So the file is
                # durable before the transaction starts. (Alone, the two
                # overlap: the lowest latency.)
                wait([written])
            with self.db.write_session(deadline) as s:
                is_new = record_instance(s, item)
                written.result()  # an OSError here rolls the row back
        except UIDConflict as exc:
            wait([written])
            # No row names this path (the conflict says the UID lives elsewhere):
            # the file is this refused object's alone.
            self.spool.path(relative).unlink(missing_ok=True)
            return self._conflict(obj, ident, exc)
        except DeadlineExceeded:
            wait([written])  # the file stays, as below
            return self._refuse(
                obj,
                status.OUT_OF_RESOURCES,
                f"database busy: not written within {self.store_deadline:g} s "
                "(scp.store_deadline_seconds)",
                deadline + _AUDIT_BUDGET,
            )
        except OSError as exc:
            why = "disk full" if exc.errno == errno.ENOSPC else f"write failed: {exc.strerror}"
            return self._refuse(obj, status.OUT_OF_RESOURCES, why)
        except Exception as exc:
            # The file stays: an earlier, acknowledged copy may be the one we
            # just replaced, and the sender will resend this one.
            wait([written])
            log.debug("database write failed", exc_info=exc)
            why = f"database error: {type(exc).__name__}"
            if time.monotonic() >= deadline:
                why += f" (not written within {self.store_deadline:g} s)"
            return self._refuse(obj, status.OUT_OF_RESOURCES, why, deadline + _AUDIT_BUDGET)
        log.debug(
            "stored %s (study %s, %s)",
            ident.sop_instance_uid,
            ident.study_instance_uid,
            "new" if is_new else "duplicate",
        )
        if self.on_stored is not None:
            self.on_stored()
        if ident.study_instance_uid in self._mpps_waiting and self.on_ready is not None:
            self.on_ready()
        return status.SUCCESS

    def refresh_mpps_waiting(self) -> None:
        """After the completer used an MPPS: its study waits no more."""
        with self.db.session() as s:
            self._mpps_waiting = waiting_studies(s)

    def on_mpps(self, message: mpps.ProcedureStepMessage) -> int:
        """The DIMSE status for an MPPS N-CREATE or N-SET; never raises."""
        try:
            with self.db.session() as s:
                code = record_message(s, message)
                waiting = waiting_studies(s)
        except Exception as exc:
            log.error(
                "MPPS %s not recorded: %s", printable(message.sop_instance_uid),
                type(exc).__name__,
            )  # fmt: skip
            log.debug("MPPS traceback", exc_info=exc)
            return mpps.PROCESSING_FAILURE
        self._mpps_waiting = waiting
        log.info(
            "MPPS %s %s from %s: %s, study %s, %d instance(s) listed (status 0x%04X)",
            printable(message.sop_instance_uid), message.kind.upper(),
            printable(message.calling_ae), message.status or "-",
            printable(message.study_instance_uid or "-"),
            len(message.instance_uids or []), code,
        )  # fmt: skip
        if message.status == mpps.COMPLETED and self.on_ready is not None:
            self.on_ready()  # the instances may all be here already
        return code

    def _item(self, obj: ReceivedObject, ident: Identity) -> StoredInstance:
        """What gets recorded of an object; its path is the same in either spool."""
        return StoredInstance(
            study_instance_uid=ident.study_instance_uid,
            series_instance_uid=ident.series_instance_uid,
            sop_instance_uid=ident.sop_instance_uid,
            sop_class_uid=ident.sop_class_uid,
            transfer_syntax_uid=obj.transfer_syntax_uid,
            modality=ident.modality,
            path=self.spool.relative_path(
                ident.study_instance_uid, ident.series_instance_uid, ident.sop_instance_uid
            ),
            size_bytes=len(obj.file_bytes),
            calling_ae=obj.calling_ae,
            association_id=obj.association_id,
        )

    def _conflict(self, obj: ReceivedObject, ident: Identity, exc: UIDConflict) -> int:
        return self._refuse(
            obj,
            STATUS_UID_CONFLICT,
            str(exc),
            study_instance_uid=ident.study_instance_uid,
            recorded_study_instance_uid=exc.other_study,
            series_instance_uid=ident.series_instance_uid,
        )

    def _store_ancillary(
        self, obj: ReceivedObject, ident: Identity, reason: str, deadline: float
    ) -> int:
        """Keep (or drop) an object that is never analysed; it touches no study."""
        item = self._item(obj, ident)
        relative = item.path
        stored = self.ancillary is not None
        try:
            if self.ancillary is not None:
                self.ancillary.write(relative, obj.file_bytes)
            with self.db.write_session(deadline) as s:
                record_ancillary(s, item, reason, stored=stored)
        except UIDConflict as exc:
            if self.ancillary is not None:
                self.ancillary.path(relative).unlink(missing_ok=True)
            return self._conflict(obj, ident, exc)
        except DeadlineExceeded:
            return self._refuse(obj, status.OUT_OF_RESOURCES, "database busy")
        except OSError as exc:
            why = "disk full" if exc.errno == errno.ENOSPC else f"write failed: {exc.strerror}"
            return self._refuse(obj, status.OUT_OF_RESOURCES, why)
        log.debug("%s %s (%s)", "kept" if stored else "dropped", ident.sop_instance_uid, reason)
        return status.SUCCESS

    def recover(self) -> int:
        """Record every spool file that has no row; returns how many."""
        with self.db.session() as s:
            known = known_instance_paths(s)
        missing = [p for p in self.spool.stored() if p not in known]
        for relative in missing:
            path = self.spool.path(relative)
            data = path.read_bytes()
            try:
                ident = identify(data)
            except InvalidDataset as exc:
                log.warning("spool file %s not recoverable: %s", relative, exc)
                continue
            item = StoredInstance(
                study_instance_uid=ident.study_instance_uid,
                series_instance_uid=ident.series_instance_uid,
                sop_instance_uid=ident.sop_instance_uid,
                sop_class_uid=ident.sop_class_uid,
                transfer_syntax_uid=read_transfer_syntax(path),
                modality=ident.modality,
                path=relative,
                size_bytes=len(data),
                calling_ae="RECOVERY",
            )
            with self.db.session() as s:
                record_instance(s, item)
                audit.record(
                    s,
                    EventType.INSTANCE_RECOVERED,
                    "receiver",
                    study_instance_uid=ident.study_instance_uid,
                    sop_instance_uid=ident.sop_instance_uid,
                )
        if missing:
            log.warning("recovered %d spool file(s) without a database row", len(missing))
        return len(missing)
