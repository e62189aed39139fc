"""The bookkeeper: the audit trail's sealer, verification and export.

Every stage writes its own audit rows (db/audit.py), signed as they are
written. The bookkeeper is the single writer that chains them (db/chain.py)
and the reader an auditor uses: `audit verify` and `audit export`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from db import audit, chain
from db.audit import EventType, study_story
from db.models import AuditEvent
from db.session import Database

log = logging.getLogger(__name__)


def seal_audit_trail(db: Database) -> chain.SealResult | None:
    """Chain the new audit rows; logs the chain's head (journald keeps it)."""
    if db.audit_key is None:
        return None
    with db.session() as s:
        result = chain.seal(s, db.audit_key)
        if result.sealed:
            # The pass itself is an event, chained last in the same transaction:
            # no later pass is needed for it, so sealing never feeds itself.
            audit.record(
                s,
                EventType.AUDIT_SEALED,
                "bookkeeper",
                sealed=result.sealed,
                head_seq=result.head_seq,
                head_mac=result.head_mac,
            )
            s.flush()
            last = chain.seal(s, db.audit_key)
            result = chain.SealResult(
                result.sealed + last.sealed, last.head_seq, last.head_mac, result.skipped
            )
    if result.sealed:
        # At INFO on purpose: a truncated tail leaves no trace in the database,
        # but the head logged here no longer matches `audit verify`.
        log.info(
            "audit chain sealed %d event(s): head seq %d mac %s",
            result.sealed,
            result.head_seq,
            result.head_mac,
        )
    if result.skipped:
        log.warning(
            "%d audit row(s) without a valid signature left unsealed: run `secondreader audit "
            "verify`",
            result.skipped,
        )
    return result


def verify_audit_trail(db: Database) -> chain.ChainReport:
    if db.audit_key is None:
        raise chain.AuditKeyMissing("no audit key: `secondreader db upgrade` creates it")
    with db.session() as s:
        return chain.verify(s, db.audit_key)


def _row(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "seq": event.seq,
        "at": event.at.isoformat(timespec="microseconds"),
        "event_type": event.event_type,
        "actor": event.actor,
        "study_instance_uid": event.study_instance_uid,
        "sop_instance_uid": event.sop_instance_uid,
        "detail": event.detail,
    }


def export_audit_trail(
    db: Database,
    *,
    study_instance_uid: str | None = None,
    since: datetime | None = None,
    fmt: str = "jsonl",
) -> str:
    """The trail (or one study's story, associations included) in time order."""
    with db.session() as s:
        events = study_story(s, study_instance_uid=study_instance_uid, since=since)
        rows = [_row(e) for e in events]
    return _jsonl(rows) if fmt == "jsonl" else _csv(rows)


def _jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def _csv(rows: Iterable[dict[str, Any]]) -> str:
    out = io.StringIO()
    fields = ["id", "seq", "at", "event_type", "actor", "study_instance_uid", "sop_instance_uid"]
    writer = csv.DictWriter(out, fieldnames=[*fields, "detail"])
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "detail": json.dumps(r["detail"], ensure_ascii=False)})
    return out.getvalue()
