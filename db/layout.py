"""The state folder's layout (`storage.state_dir`), in one place.

    <state_dir>/
        secondreader.db        the embedded SQLite database (database.url empty)
        audit.key              the audit key, when there is no config file (audit.key_file)
        serve.running          present while `serve` runs: its absence after a crash is noticed
        spool/                 received images, <study>/<series>/<instance>.dcm (receive)
        ancillary/             non-image objects kept, never analysed (receive)
        saliency/              saliency maps, <study>/run-<id>.npz (analyse; db/saliency.py)
        outbox/                objects to send, <study>/<uid>.dcm, AI and verified SRs
                               (report, review; the rows: db/outbox.py)
        trash/                 a file being removed, parked while its removal is checked (retain)

Rows store paths relative to the state folder ("outbox/<study>/<uid>.dcm",
"saliency/<study>/run-1.npz") or to the spool; every stage builds its folders
from the names here, and nothing else spells them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATABASE_FILE = "secondreader.db"
AUDIT_KEY_FILE = "audit.key"
RUNNING_MARKER = "serve.running"
SPOOL_DIR = "spool"
ANCILLARY_DIR = "ancillary"
SALIENCY_DIR = "saliency"
OUTBOX_DIR = "outbox"
TRASH_DIR = "trash"


@dataclass(frozen=True)
class StateLayout:
    """The folders and files under one state folder."""

    root: Path

    @property
    def database(self) -> Path:
        return self.root / DATABASE_FILE

    @property
    def running_marker(self) -> Path:
        return self.root / RUNNING_MARKER

    @property
    def spool(self) -> Path:
        return self.root / SPOOL_DIR

    @property
    def ancillary(self) -> Path:
        return self.root / ANCILLARY_DIR

    @property
    def saliency(self) -> Path:
        return self.root / SALIENCY_DIR

    @property
    def outbox(self) -> Path:
        return self.root / OUTBOX_DIR

    @property
    def trash(self) -> Path:
        return self.root / TRASH_DIR
