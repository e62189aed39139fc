"""Facts about this installation kept in its database: the audit key's fingerprint.

Every process signs audit rows with the same key (audit.key_file). A process
started with another key would write rows that `audit verify` reports as
inserted behind our back: a false tamper alarm. So `db upgrade` records the
key's fingerprint (an HMAC of a fixed text under the key: it reveals nothing
of the key) and every process compares its own at start.
"""

from __future__ import annotations

import hashlib
import hmac

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import AuditEvent, InstallationSetting, utcnow

AUDIT_KEY_FINGERPRINT = "audit_key_fingerprint"


class AuditKeyMismatch(Exception):
    """This process's audit key is not the one the database's rows are signed with."""


def fingerprint(key: bytes) -> str:
    return hmac.new(key, b"secondreader audit key fingerprint", hashlib.sha256).hexdigest()[:16]


def recorded_fingerprint(session: Session) -> str | None:
    row = session.get(InstallationSetting, AUDIT_KEY_FINGERPRINT)
    return row.value if row is not None else None


def record_fingerprint(session: Session, key: bytes) -> None:
    row = session.get(InstallationSetting, AUDIT_KEY_FINGERPRINT)
    if row is None:
        session.add(InstallationSetting(name=AUDIT_KEY_FINGERPRINT, value=fingerprint(key),
                                        updated_at=utcnow()))  # fmt: skip
    else:
        row.value, row.updated_at = fingerprint(key), utcnow()


def signed_rows(session: Session) -> int:
    """Audit rows signed with some key: a database that needs its own key back."""
    return int(session.scalar(select(func.count()).where(AuditEvent.row_mac.is_not(None))) or 0)


def check_key(session: Session, key: bytes, key_path: str) -> None:
    """Raise AuditKeyMismatch when the database records another key's fingerprint."""
    recorded = recorded_fingerprint(session)
    mine = fingerprint(key)
    if recorded is not None and not hmac.compare_digest(recorded, mine):
        raise AuditKeyMismatch(
            f"the audit key {key_path} (fingerprint {mine}) is not this database's "
            f"(fingerprint {recorded}): every process must use the same key; copy audit.key "
            "from the host where `secondreader db upgrade` ran, or set audit.key_file"
        )
