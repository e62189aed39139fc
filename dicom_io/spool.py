"""The spool: received objects on disk, one file per SOP instance.

Layout: <root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm. The UIDs are
validated (digits and dots) before they become path components, so no
received value can point outside the root. Writes are atomic: a temporary
file in <root>/.incoming, fdatasync, rename, fsync of the directory. A crash
leaves either the old file, the new one, or a stray temporary that
`sweep_incoming` removes at start-up; never half a file under its real name.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from dicom_io.identify import valid_uid

INCOMING = ".incoming"


class Spool:
    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        self.incoming = root / INCOMING
        self.incoming.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        for uid in (study_uid, series_uid, sop_uid):
            if not valid_uid(uid):
                raise ValueError("not a valid UID; refusing to build a spool path from it")
        return f"{study_uid}/{series_uid}/{sop_uid}.dcm"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def write(self, relative: str, data: bytes) -> int:
        """Atomically put `data` at `relative`; returns the size written."""
        target = self.root / relative
        tmp = self.incoming / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    # The data and what reading it back needs (its size, its
                    # blocks); not the timestamps, which nothing relies on.
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            try:
                os.replace(tmp, target)
            except FileNotFoundError:
                # The first object of its series (or retention removed the
                # folder meanwhile): make the folders only then, not per object.
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            # The rename itself is only durable once its directory is synced.
            dfd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return len(data)

    def sweep_incoming(self) -> int:
        """Remove temporaries left by a crash; they were never acknowledged."""
        n = 0
        for part in self.incoming.glob("*.part"):
            part.unlink(missing_ok=True)
            n += 1
        return n

    def stored(self) -> list[str]:
        """Relative paths of every stored object (the layout's three levels)."""
        return sorted(str(p.relative_to(self.root)) for p in self.root.glob("*/*/*.dcm"))
