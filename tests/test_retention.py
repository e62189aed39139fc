"""Retention (daemon/stages/retain.py): finished studies lose their files, nothing else does.

Every test builds its studies through the stages' own calls (tests/reportdata.py,
the reporter, the outbox), then tries hard to make retention remove what it
must not: studies receiving, queued, unreported, undelivered, a late copy of
an instance arriving in the middle of a removal. The watermark tests run on
a small tmpfs of their own, so the disk figures are real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from daemon.config import Config
from daemon.stages import retain as cleaner_module
from daemon.stages.report import Reporter
from daemon.stages.retain import Cleaner
from db import audit, migrate
from db.audit import EventType
from db.models import AnalysisRun, Instance, OutboxItem, Series, Study, utcnow
from db.outbox import due_items, mark_done
from db.queue import study_series_files
from db.session import Database
from db.studies import complete_stable_studies, get_study
from tests import reportdata as rd
from tests.configs import write_config

KEY = bytes(range(32))
REPO = Path(__file__).resolve().parent.parent


def make_config(tmp_path: Path, state: Path, retention: str = "") -> Config:
    (tmp_path / "audit.key").write_text(KEY.hex())
    return write_config(
        tmp_path,
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        f"""
[audit]
key_file = "{tmp_path / "audit.key"}"

[[delivery.destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 11112

[retention]
{retention}
""",
        state=state,
    )


def open_db(config: Config) -> Database:
    migrate.upgrade(config.database_url)
    return Database(config.database_url, audit_key=KEY)


def finished(db: Database, config: Config, folder: Path, **kw: int) -> str:
    """A study received, analysed, reported and delivered: retention may take its files."""
    study_uid = reported(db, config, folder, **kw)
    deliver(db, study_uid)
    return study_uid


def reported(db: Database, config: Config, folder: Path, **kw: int) -> str:
    files = rd.ct_study(folder, seed=sum(folder.name.encode()), **kw)
    study_uid = rd.receive(db, config.storage.spool_dir, files)
    rd.record_analysis(db, config.storage.state_dir, study_uid, [rd.analysed(files)])
    assert Reporter(db, config).run_once() == 1
    return study_uid


def deliver(db: Database, study_uid: str) -> None:
    later = utcnow() + timedelta(seconds=2)
    with db.session() as s:
        for item in due_items(s, now=later):
            if item.study_instance_uid == study_uid:
                assert mark_done(s, item, status=0, now=later)


def age(db: Database, study_uid: str, days: float) -> None:
    """Move every time of the study `days` into the past, as if it were that old."""
    shift = timedelta(days=days)
    with db.session() as s:
        study = get_study(s, study_uid)
        assert study is not None
        for name in ("first_received_at", "receiving_since", "last_received_at", "completed_at"):
            if getattr(study, name) is not None:
                setattr(study, name, getattr(study, name) - shift)
        for run in s.scalars(select(AnalysisRun).where(AnalysisRun.study_id == study.id)):
            run.created_at -= shift
        for item in s.scalars(select(OutboxItem).where(OutboxItem.study_id == study.id)):
            item.created_at -= shift
            if item.delivered_at is not None:
                item.delivered_at -= shift


def spool_files(config: Config, study_uid: str) -> list[Path]:
    folder = config.storage.spool_dir / study_uid
    return sorted(p for p in folder.rglob("*.dcm")) if folder.exists() else []


def outbox_kinds_on_disk(db: Database, config: Config, study_uid: str) -> set[str]:
    with db.session() as s:
        study = get_study(s, study_uid)
        assert study is not None
        items = s.scalars(select(OutboxItem).where(OutboxItem.study_id == study.id)).all()
    return {i.object_kind for i in items if (config.storage.state_dir / i.path).exists()}


def instance_rows(db: Database, study_uid: str) -> int:
    with db.session() as s:
        return len(
            s.scalars(
                select(Instance).join(Series).join(Study)
                .where(Study.study_instance_uid == study_uid)
            ).all()
        )  # fmt: skip


def test_by_age_only_finished_studies_lose_their_files(tmp_path: Path) -> None:
    config = make_config(tmp_path, tmp_path / "state", "keep_days = 7")
    db = open_db(config)
    old = finished(db, config, tmp_path / "old")
    recent = finished(db, config, tmp_path / "recent")
    undelivered = reported(db, config, tmp_path / "undelivered")
    unreported_files = rd.ct_study(tmp_path / "unreported", seed=11)
    unreported = rd.receive(db, config.storage.spool_dir, unreported_files)
    rd.record_analysis(db, config.storage.state_dir, unreported, [rd.analysed(unreported_files)])
    queued = rd.receive(db, config.storage.spool_dir, rd.ct_study(tmp_path / "queued", seed=12))
    with db.session() as s:  # complete: a job is queued, nobody takes it
        complete_stable_studies(
            s, stable_seconds=0.001, max_seconds=3600, now=utcnow() + timedelta(seconds=5)
        )
    receiving = rd.receive(db, config.storage.spool_dir, rd.ct_study(tmp_path / "rcv", seed=13))
    # Everything but `recent` looks 30 days old: only the state may protect it.
    for uid in (old, undelivered, unreported, queued, receiving):
        age(db, uid, 30)
    before = {uid: spool_files(config, uid) for uid in (old, recent, undelivered, unreported,
                                                          queued, receiving)}  # fmt: skip
    assert all(before.values())

    dry = Cleaner(db, config).run_once(dry_run=True)
    assert [r.study_instance_uid for r in dry.removed] == [old]
    assert spool_files(config, old) == before[old]  # a dry run removes nothing

    report = Cleaner(db, config).run_once()
    (removed,) = report.removed
    assert (removed.study_instance_uid, removed.reason) == (old, "age")
    assert spool_files(config, old) == []
    assert not (config.storage.state_dir / "saliency" / old).exists()
    # The SR stays (amendments build on it); the other objects go.
    assert outbox_kinds_on_disk(db, config, old) == {"sr"}
    for uid in (recent, undelivered, unreported, queued, receiving):
        assert spool_files(config, uid) == before[uid], uid
    # The rows keep their history; the removal is recorded and audited.
    assert instance_rows(db, old) == len(before[old])
    with db.session() as s:
        study = get_study(s, old)
        assert study is not None and study.files_removed_at is not None
        (event,) = audit.events(s, EventType.STUDY_FILES_REMOVED)
    assert event.study_instance_uid == old and event.detail["reason"] == "age"
    assert event.detail["files"] == removed.files > len(before[old])  # images + objects
    # A second pass finds nothing more to do.
    assert Cleaner(db, config).run_once().removed == []
    db.dispose()


def test_a_late_copy_during_the_removal_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path, tmp_path / "state", "keep_days = 1")
    db = open_db(config)
    study_uid = finished(db, config, tmp_path / "a")
    age(db, study_uid, 10)
    files = sorted((tmp_path / "a").glob("*.dcm"))
    real_mark = cleaner_module.mark_files_removed

    # The same instance is sent again after retention chose the study and
    # looked at its files: its new file lands first, its row commits only
    # after the removal was recorded (the receive stage overlaps the two).
    def resent_meanwhile(session, study):
        copy = tmp_path / "resent.dcm"
        copy.write_bytes(files[0].read_bytes())
        ds = dcmread(copy, stop_before_pixels=True)
        relative = f"{study_uid}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        target = config.storage.spool_dir / relative
        tmp = target.with_suffix(".part")
        tmp.write_bytes(copy.read_bytes())
        os.replace(tmp, target)  # a new file (new inode), as the spool writes it
        return real_mark(session, study)

    monkeypatch.setattr(cleaner_module, "mark_files_removed", resent_meanwhile)
    (removed,) = Cleaner(db, config).run_once().removed
    assert removed.study_instance_uid == study_uid
    # The row of the re-sent copy commits now; its file must be there.
    rd.receive(db, config.storage.spool_dir, files[:1])
    (kept,) = spool_files(config, study_uid)
    assert kept.read_bytes() == files[0].read_bytes()
    # The re-opened study is analysed on what it has: the new copy only.
    with db.session() as s:
        study = get_study(s, study_uid)
        assert study is not None and study.state == "receiving"
        (series,) = study_series_files(s, study.id)
    assert [Path(p).name for p in series.paths] == [kept.name]
    db.dispose()


def test_a_late_instance_before_the_record_keeps_the_whole_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path, tmp_path / "state", "keep_days = 1")
    db = open_db(config)
    study_uid = finished(db, config, tmp_path / "a")
    age(db, study_uid, 10)
    before = spool_files(config, study_uid)
    real_mark = cleaner_module.mark_files_removed

    def reopened_meanwhile(session, study):
        extra = rd.ct_study(tmp_path / "extra", slices=1, seed=99)
        ds = dcmread(extra[0])
        ds.StudyInstanceUID = study.study_instance_uid
        ds.save_as(extra[0])
        rd.receive(db, config.storage.spool_dir, extra)  # commits: the study re-opens
        return real_mark(session, study)

    monkeypatch.setattr(cleaner_module, "mark_files_removed", reopened_meanwhile)
    assert Cleaner(db, config).run_once().removed == []
    assert set(before) <= set(spool_files(config, study_uid))
    with db.session() as s:
        study = get_study(s, study_uid)
        assert study is not None and study.files_removed_at is None
        assert audit.events(s, EventType.STUDY_FILES_REMOVED) == []
    db.dispose()


def test_an_interrupted_removal_is_finished_at_the_next_start(tmp_path: Path) -> None:
    config = make_config(tmp_path, tmp_path / "state", "keep_days = 1")
    db = open_db(config)
    study_uid = finished(db, config, tmp_path / "a")
    age(db, study_uid, 10)
    cleaner = Cleaner(db, config)
    (study,) = cleaner._finished()
    # The crash: the removal recorded, not one file removed yet, and one file
    # parked in the trash at the very moment of the crash.
    with db.session() as s:
        assert cleaner_module.mark_files_removed(s, study)
    files = spool_files(config, study_uid)
    parked = cleaner.trash / "crashed" / files[0].relative_to(config.storage.state_dir)
    parked.parent.mkdir(parents=True)
    os.rename(files[0], parked)

    # The images, the saliency file, the parametric map, GSPS and summary (the SR stays).
    assert cleaner.sweep() == len(files) + 4
    assert spool_files(config, study_uid) == []
    assert not cleaner.trash.exists()
    assert outbox_kinds_on_disk(db, config, study_uid) == {"sr"}
    db.dispose()


# -- the disk watermark, on a real small disk ---------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    where = tmp_path / "state"
    where.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)],
        capture_output=True, text=True,
    )  # fmt: skip
    if r.returncode != 0:
        pytest.fail("the watermark tests mount a tmpfs and need root: " + r.stderr.strip())
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def fill_to(cleaner: Cleaner, path: Path, percent: float) -> None:
    """Other data on the disk (not ours to remove), up to `percent` of it in use."""
    disk = cleaner.disk()
    missing = int(disk.total * percent / 100) - disk.used
    assert missing > 0, f"the studies alone use {disk.percent:.0f} % of the test disk"
    path.write_bytes(os.urandom(missing))


def test_watermark_removes_oldest_finished_first_until_below_low(
    tmp_path: Path, small_disk: Path
) -> None:
    # keep_days far off: only the disk can make room.
    config = make_config(
        tmp_path, small_disk,
        "keep_days = 365\nhigh_watermark_percent = 60\nlow_watermark_percent = 45",
    )  # fmt: skip
    db = open_db(config)
    studies = []
    for k, name in enumerate(("oldest", "middle", "newest")):
        studies.append(finished(db, config, tmp_path / name, slices=20, size=256))
        age(db, studies[-1], 30 - k)  # finished 30, 29, 28 days ago
    undelivered = reported(db, config, tmp_path / "undelivered", slices=20, size=256)
    age(db, undelivered, 60)  # the oldest of all, but not finished
    cleaner = Cleaner(db, config)
    fill_to(cleaner, small_disk / "other-data", 65)

    report = cleaner.run_once()
    removed = [r.study_instance_uid for r in report.removed]
    assert removed == studies[: len(removed)] and removed  # oldest first, in order
    assert report.disk_after.percent <= 45 and not report.blocked
    assert {r.reason for r in report.removed} == {"watermark"}
    assert spool_files(config, undelivered)
    for uid in studies[len(removed) :]:
        assert spool_files(config, uid)
    db.dispose()


def test_nothing_left_to_remove_is_said_loudly_and_receiving_goes_on(
    tmp_path: Path, small_disk: Path
) -> None:
    config = make_config(
        tmp_path, small_disk, "high_watermark_percent = 50\nlow_watermark_percent = 40"
    )
    db = open_db(config)
    done = finished(db, config, tmp_path / "done", slices=10, size=256)
    undelivered = reported(db, config, tmp_path / "undelivered", slices=10, size=256)
    # Far more than half of the disk is other data: removing `done` cannot help.
    fill_to(Cleaner(db, config), small_disk / "other-data", 85)

    report = Cleaner(db, config).run_once()
    assert [r.study_instance_uid for r in report.removed] == [done]
    assert report.blocked and report.disk_after.percent >= 50
    assert spool_files(config, undelivered)
    db.dispose()

    env = {**os.environ, "SECONDREADER_CONFIG": str(tmp_path / "secondreader.toml")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", *args], cwd=REPO, env=env,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    run = cli("cleanup")
    assert run.returncode == 2 and "DISK NEARLY FULL" in run.stderr
    status = json.loads(cli("status", "--json").stdout)
    assert status["storage"]["blocked"] is True
    assert status["storage"]["studies_files_removed"] == 1
    assert "DISK NEARLY FULL" in cli("status").stdout


@pytest.mark.parametrize(
    ("start", "end", "inside", "outside"),
    [("01:00", "05:00", "03:30", "12:00"), ("22:00", "04:00", "23:30", "04:00")],
)
def test_removal_by_age_only_inside_the_off_peak_window(
    tmp_path: Path, start: str, end: str, inside: str, outside: str
) -> None:
    config = make_config(
        tmp_path, tmp_path / "state",
        f'keep_days = 1\nwindow_start = "{start}"\nwindow_end = "{end}"',
    )  # fmt: skip
    db = open_db(config)
    study_uid = finished(db, config, tmp_path / "a")
    age(db, study_uid, 10)

    def at(hhmm: str) -> Cleaner:
        hour, minute = map(int, hhmm.split(":"))
        return Cleaner(db, config, clock=lambda: datetime(2026, 12, 2, hour, minute))

    report = at(outside).run_once()
    assert not report.in_window and report.removed == []
    assert spool_files(config, study_uid)
    report = at(inside).run_once()
    assert report.in_window and [r.study_instance_uid for r in report.removed] == [study_uid]
    db.dispose()
