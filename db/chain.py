"""The tamper-evident audit trail: each row signed when written, chained by one sealer.

Two MACs (HMAC-SHA256, key outside the database):

* `row_mac`, computed by `db.audit.record` over the row's content and a
  random nonce, in the writer's own transaction. No lock: the receive path
  never waits for the chain. A row inserted by hand has no valid one.
* `chain_mac`, computed by the sealer over the row's sequence number, its
  row MAC and the previous row's chain MAC. One sealer (serve's scheduler,
  under an advisory lock on PostgreSQL) chains the rows it can see, in id
  order, every few seconds. On PostgreSQL ids are not commit-ordered: a row
  with a lower id may become visible after higher ones were sealed; it has
  no sequence number yet, so the next pass chains it. Chain order is seal
  order, and no committed row is ever skipped.

`verify` walks the chain: a changed row breaks its row MAC, a deleted one
leaves a gap in the sequence, an inserted one has no valid row MAC. A
truncated tail leaves no trace in the database; the head of the chain is
logged at INFO after every pass (journald keeps it) to compare against.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, cast

from sqlalchemy import Row, func, select, text, update
from sqlalchemy.orm import Session

from db.models import AuditEvent

KEY_BYTES = 32
GENESIS = "0" * 64
_PG_SEALER_LOCK = 0x5EC0AD  # pg_advisory_xact_lock key: one sealer at a time


class AuditKeyMissing(FileNotFoundError):
    pass


def create_key(path: Path) -> bool:
    """Create the key file (mode 0600) if it does not exist; True if created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(KEY_BYTES) + "\n")
    return True


def load_key(path: Path) -> bytes:
    try:
        raw = path.read_text().strip()
    except FileNotFoundError as exc:
        raise AuditKeyMissing(
            f"audit key {path} not found: `secondreader db upgrade` creates it"
        ) from exc
    key = bytes.fromhex(raw)
    if len(key) < 16:
        raise ValueError(f"audit key {path} is too short")
    return key


class SignedRow(Protocol):
    """What a row's MAC covers: an AuditEvent, a selected row, or a row about to be inserted."""

    nonce: str | None
    at: datetime
    event_type: str
    actor: str
    study_instance_uid: str | None
    sop_instance_uid: str | None
    detail: Any


def canonical(event: SignedRow | Row[Any]) -> bytes:
    """The signed content of a row: every column but the MACs and the sequence number."""
    doc = [
        event.nonce,
        event.at.isoformat(timespec="microseconds"),
        event.event_type,
        event.actor,
        event.study_instance_uid,
        event.sop_instance_uid,
        event.detail,
    ]
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def row_mac(key: bytes, event: SignedRow | Row[Any]) -> str:
    return hmac.new(key, canonical(event), hashlib.sha256).hexdigest()


def chain_mac(key: bytes, seq: int, previous: str, mac: str) -> str:
    return hmac.new(key, f"{seq}:{previous}:{mac}".encode(), hashlib.sha256).hexdigest()


def _valid_row(key: bytes, event: AuditEvent | Row[Any]) -> bool:
    return event.row_mac is not None and hmac.compare_digest(event.row_mac, row_mac(key, event))


def key_signed(session: Session, key: bytes) -> bool:
    """True when `key` signed the newest signed audit row (or no row is signed yet)."""
    row = session.scalars(
        select(AuditEvent).where(AuditEvent.row_mac.is_not(None)).order_by(AuditEvent.id.desc())
    ).first()
    return row is None or _valid_row(key, row)


def _head(session: Session) -> tuple[int, str]:
    row = session.execute(
        select(AuditEvent.seq, AuditEvent.chain_mac)
        .where(AuditEvent.seq.is_not(None))
        .order_by(AuditEvent.seq.desc())
        .limit(1)
    ).first()
    return (0, GENESIS) if row is None else (int(cast(int, row[0])), str(row[1]))


@dataclass(frozen=True)
class SealResult:
    sealed: int
    head_seq: int
    head_mac: str
    skipped: int  # unsealed rows without a valid row MAC: left for `verify` to name


def seal(session: Session, key: bytes, *, limit: int = 5000) -> SealResult:
    """Chain the visible unsealed rows with a valid row MAC, in id order."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_SEALER_LOCK})
    seq, previous = _head(session)
    # Columns, not ORM objects: a pass after a 300-image study seals 300
    # rows, and loading them as objects cost the analysis running beside it
    # half a second of the interpreter.
    rows = session.execute(
        select(
            AuditEvent.id,
            AuditEvent.nonce,
            AuditEvent.at,
            AuditEvent.event_type,
            AuditEvent.actor,
            AuditEvent.study_instance_uid,
            AuditEvent.sop_instance_uid,
            AuditEvent.detail,
            AuditEvent.row_mac,
        )
        .where(AuditEvent.seq.is_(None))
        .order_by(AuditEvent.id)
        .limit(limit)
    ).all()
    updates = []
    skipped = 0
    for event in rows:
        if not _valid_row(key, event):
            skipped += 1
            continue
        seq += 1
        previous = chain_mac(key, seq, previous, str(event.row_mac))
        updates.append({"id": event.id, "seq": seq, "chain_mac": previous})
    if updates:
        session.execute(update(AuditEvent), updates)
    return SealResult(len(updates), seq, previous, skipped)


def sign_unsigned(session: Session, key: bytes) -> int:
    """Sign the rows written before the trail was signed (`db upgrade`); returns how many.

    Only rows older than the first signed one: `db upgrade` runs at every
    service start, and a row inserted by hand later must stay unsigned (and
    be named by `verify`), not be adopted at the next restart.
    """
    first_signed = session.execute(
        select(func.min(AuditEvent.id)).where(AuditEvent.row_mac.is_not(None))
    ).scalar()
    stmt = select(AuditEvent).where(AuditEvent.row_mac.is_(None))
    if first_signed is not None:
        stmt = stmt.where(AuditEvent.id < first_signed)
    rows = session.scalars(stmt).all()
    for event in rows:
        if event.nonce is None:
            event.nonce = secrets.token_hex(16)
        event.row_mac = row_mac(key, event)
    return len(rows)


@dataclass(frozen=True)
class Problem:
    kind: str  # "altered", "deleted", "inserted", "chain"
    row_id: int | None
    seq: int | None
    message: str


@dataclass
class ChainReport:
    sealed: int = 0
    unsealed: int = 0
    head_seq: int = 0
    head_mac: str = GENESIS
    problems: list[Problem] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems


def verify(session: Session, key: bytes) -> ChainReport:
    """Walk the whole trail; every problem found, in chain order, then unsealed rows."""
    report = ChainReport()
    expected: int = 1
    previous: str | None = GENESIS
    sealed = session.scalars(
        select(AuditEvent).where(AuditEvent.seq.is_not(None)).order_by(AuditEvent.seq)
    )
    for event in sealed:
        assert event.seq is not None
        if event.seq != expected:
            missing = f"{expected}" if event.seq == expected + 1 else f"{expected}-{event.seq - 1}"
            report.problems.append(
                Problem(
                    "deleted",
                    None,
                    expected,
                    f"row(s) deleted: sequence {missing} missing before row id {event.id}",
                )
            )
            previous = None  # the deleted row's MAC is gone: this link cannot be checked
        if not _valid_row(key, event):
            report.problems.append(
                Problem(
                    "altered",
                    event.id,
                    event.seq,
                    f"row id {event.id} (seq {event.seq}, {event.event_type}) was altered",
                )
            )
        elif previous is not None and event.chain_mac != chain_mac(
            key, event.seq, previous, str(event.row_mac)
        ):
            report.problems.append(
                Problem(
                    "chain",
                    event.id,
                    event.seq,
                    f"chain broken at row id {event.id} (seq {event.seq}): "
                    "its sequence number or chain MAC was changed",
                )
            )
        # Go on from the stored MAC: one bad row is reported once, not to the end.
        previous = str(event.chain_mac)
        expected = event.seq + 1
        report.sealed += 1
        report.head_seq, report.head_mac = event.seq, previous
    unsealed = session.scalars(
        select(AuditEvent).where(AuditEvent.seq.is_(None)).order_by(AuditEvent.id)
    )
    for event in unsealed:
        if _valid_row(key, event):
            report.unsealed += 1
        else:
            report.problems.append(
                Problem(
                    "inserted",
                    event.id,
                    None,
                    f"row id {event.id} ({event.event_type}) was not written by secondreader "
                    "(inserted, or altered before it was sealed)",
                )
            )
    return report
