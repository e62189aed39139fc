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
from concurrent.futures import ThreadPoolExecutor, wait

from db import audit
from db.audit import EventType
from db.ingest import StoredInstance, known_instance_paths, record_instance
from db.session import Database
from dicom_io.identify import (
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    InvalidDataset,
    check_complete,
    identify,
    read_transfer_syntax,
    valid_uid,
)
from dicom_io.scp import AssociationOutcome, ReceivedObject
from dicom_io.sopclasses import is_image_storage
from dicom_io.spool import Spool

log = logging.getLogger(__name__)


class Receiver:
    def __init__(self, db: Database, spool: Spool, max_associations: int = 10) -> None:
        self.db = db
        self.spool = spool
        # One spool writer per concurrent association at most.
        self._io = ThreadPoolExecutor(max_associations, thread_name_prefix="spool")

    def close(self) -> None:
        self._io.shutdown(wait=True)

    def on_association(self, outcome: AssociationOutcome) -> None:
        with self.db.session() as s:
            audit.record(
                s,
                EventType.ASSOCIATION_ACCEPTED
                if outcome.accepted
                else EventType.ASSOCIATION_REJECTED,
                outcome.calling_ae,
                address=outcome.address,
                reason=outcome.reason,
            )

    def _refuse(self, obj: ReceivedObject, status: int, why: str) -> int:
        log.warning("refused SOP instance from %s: %s (status 0x%04X)", obj.calling_ae, why, status)
        try:
            with self.db.session() as s:
                audit.record(
                    s,
                    EventType.INSTANCE_FAILED,
                    obj.calling_ae,
                    # The C-STORE request's UID, when it is one: says which instance it was.
                    sop_instance_uid=(
                        obj.sop_instance_uid if valid_uid(obj.sop_instance_uid) else None
                    ),
                    status=status,
                    reason=why,
                )
        except Exception:
            log.exception("could not audit a refused instance")
        return status

    def on_store(self, obj: ReceivedObject) -> int:
        try:
            ident = identify(obj.file_bytes)
            check_complete(obj.dataset, obj.transfer_syntax_uid)
        except InvalidDataset as exc:
            return self._refuse(obj, exc.status, str(exc))
        if (
            ident.sop_instance_uid != obj.sop_instance_uid
            or ident.sop_class_uid != obj.sop_class_uid
        ):
            return self._refuse(
                obj, STATUS_DATASET_MISMATCH, "dataset UIDs differ from the C-STORE request"
            )
        if not is_image_storage(ident.sop_class_uid):
            return self._refuse(obj, STATUS_DATASET_MISMATCH, "not an image storage SOP class")

        relative = self.spool.relative_path(
            ident.study_instance_uid, ident.series_instance_uid, ident.sop_instance_uid
        )
        item = StoredInstance(
            study_instance_uid=ident.study_instance_uid,
            series_instance_uid=ident.series_instance_uid,
            sop_instance_uid=ident.sop_instance_uid,
            sop_class_uid=ident.sop_class_uid,
            transfer_syntax_uid=obj.transfer_syntax_uid,
            modality=ident.modality,
            path=relative,
            size_bytes=len(obj.file_bytes),
            calling_ae=obj.calling_ae,
        )
        # The file's write and fsyncs run while the row's statements run; the
        # commit waits for the file. Both are milliseconds of waiting on the
        # disk, and over one association they are the whole per-object cost.
        written = self._io.submit(self.spool.write, relative, obj.file_bytes)
        try:
            with self.db.session() as s:
                is_new = record_instance(s, item)
                written.result()  # an OSError here rolls the row back
        except OSError as exc:
            why = "disk full" if exc.errno == errno.ENOSPC else f"write failed: {exc.strerror}"
            return self._refuse(obj, STATUS_OUT_OF_RESOURCES, why)
        except Exception as exc:
            # The file stays: an earlier, acknowledged copy may be the one we
            # just replaced, and the sender will resend this one.
            wait([written])
            log.exception("database write failed for SOP instance %s", ident.sop_instance_uid)
            return self._refuse(
                obj, STATUS_OUT_OF_RESOURCES, f"database error: {type(exc).__name__}"
            )
        log.debug(
            "stored %s (study %s, %s)",
            ident.sop_instance_uid,
            ident.study_instance_uid,
            "new" if is_new else "duplicate",
        )
        return 0x0000

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
