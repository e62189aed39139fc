"""The spool's atomic, durable writes (dicom_io/spool.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dicom_io.spool import INCOMING, Spool


def test_objects_land_under_their_uids_in_new_and_removed_folders(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    first = spool.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    second = spool.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.6")
    # The study and series folders do not exist yet: the first write makes them.
    assert spool.write(first, b"first") == 5
    assert spool.write(second, b"second") == 6
    assert spool.path(first).read_bytes() == b"first"
    assert sorted(spool.stored()) == sorted([first, second])
    # Retention removed the study's folder: the next object of it still lands.
    shutil.rmtree(spool.root / "1.2.3")
    assert spool.write(second, b"again") == 5
    assert spool.stored() == [second]
    assert spool.path(second).read_bytes() == b"again"
    # No temporary is left behind by any of it.
    assert list((spool.root / INCOMING).iterdir()) == []


def test_a_failed_write_leaves_neither_the_object_nor_a_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool")
    relative = spool.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", disk_full)
    with pytest.raises(OSError):
        spool.write(relative, b"data")
    assert not spool.path(relative).exists()
    assert list((spool.root / INCOMING).iterdir()) == []
