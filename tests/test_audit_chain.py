"""The tamper-evident audit trail on SQLite and PostgreSQL.

Rows are written through db.audit (signed), chained by the sealer, then
changed behind the daemon's back with plain SQL, as someone with database
access alone could. `secondreader audit verify` must name the row and exit
1; a clean chain verifies. Then the real thing under load: four storing
associations and two worker processes while the daemon's sealer runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import select, text

from db import audit, chain
from db.audit import EventType
from db.chain import create_key, load_key
from db.models import AuditEvent, Job, JobState
from db.session import Database
from tests.conftest import REPO, create_pg_database, free_port, storescu
from tests.dicomgen import ct_study
from tests.workers import WorkerProcess, wait_for


def _config(tmp_path: Path, db_url: str) -> Path:
    path = tmp_path / "secondreader.toml"
    path.write_text(
        f'[storage]\nstate_dir = "{tmp_path / "state"}"\n\n[database]\nurl = "{db_url}"\n'
    )
    create_key(tmp_path / "audit.key")  # next to the config file: the default place
    return path


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        cwd=REPO,
        env={**os.environ, "SECONDREADER_CONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _write_events(db: Database, n: int) -> list[int]:
    ids = []
    for i in range(n):
        with db.session() as s:
            e = audit.record(
                s,
                EventType.INSTANCE_STORED,
                "MODALITY",
                study_instance_uid="1.2.3.4",
                sop_instance_uid=f"1.2.3.4.{i}",
                size_bytes=1000 + i,
                ratio=0.1 * i,
                note="Zürich",
            )
            s.flush()
            ids.append(e.id)
    return ids


@pytest.mark.parametrize("tamper", ["alter", "delete", "insert"])
def test_verify_names_the_tampered_row(db_url: str, tmp_path: Path, tamper: str) -> None:
    config = _config(tmp_path, db_url)
    db = Database(db_url, audit_key=load_key(tmp_path / "audit.key"))
    ids = _write_events(db, 8)
    with db.session() as s:
        assert chain.seal(s, db.audit_key).sealed == 8  # type: ignore[arg-type]
    clean = _cli(config, "audit", "verify")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "8 sealed row(s), head seq 8" in clean.stdout and "intact" in clean.stdout

    with db.engine.begin() as conn:
        if tamper == "alter":
            conn.execute(
                text("UPDATE audit_events SET actor = 'SOMEONE' WHERE id = :id"), {"id": ids[3]}
            )
            expected = f"altered: row id {ids[3]} (seq 4, instance.stored) was altered"
        elif tamper == "delete":
            conn.execute(text("DELETE FROM audit_events WHERE id = :id"), {"id": ids[5]})
            expected = f"deleted: row(s) deleted: sequence 6 missing before row id {ids[6]}"
        else:
            # A plausible row, with a copied signature: the nonce makes it another row.
            row = conn.execute(
                text("SELECT row_mac FROM audit_events WHERE id = :id"), {"id": ids[2]}
            ).scalar_one()
            conn.execute(
                text(
                    "INSERT INTO audit_events (at, event_type, actor, detail, nonce, row_mac) "
                    "VALUES (:at, 'review.decided', 'Smith^Jane', :detail, :nonce, :mac)"
                ),
                {"at": "2026-12-01 10:00:00", "detail": json.dumps({"run_id": 1}),
                 "nonce": "f" * 32, "mac": row},
            )  # fmt: skip
            inserted = conn.execute(text("SELECT max(id) FROM audit_events")).scalar_one()
            expected = f"inserted: row id {inserted} (review.decided) was not written by"

    broken = _cli(config, "audit", "verify")
    assert broken.returncode == 1, broken.stdout
    first = next(line for line in broken.stdout.splitlines() if line.startswith("  * "))
    assert first.startswith(f"  * {expected}"), broken.stdout
    # The sealer leaves an unsigned row alone: it never becomes part of the chain.
    with db.session() as s:
        result = chain.seal(s, db.audit_key)  # type: ignore[arg-type]
    assert (result.sealed, result.skipped) == (0, 1 if tamper == "insert" else 0)
    db.dispose()


def test_a_row_committed_late_on_postgresql_is_chained_not_skipped(
    pg_server: str, tmp_path: Path
) -> None:
    """Row ids are not commit-ordered: a lower id can become visible after higher ones."""
    url = create_pg_database(pg_server, f"late_{os.getpid()}_{free_port()}")
    from db import migrate

    migrate.upgrade(url)
    db = Database(url, audit_key=b"k" * 32)
    slow = db._factory()  # a transaction that takes its id first and commits last
    slow.begin()
    early = audit.record(slow, EventType.JOB_CLAIMED, "w1", job_id=1)
    slow.flush()
    (late_id,) = _write_events(db, 1)
    assert late_id > early.id
    with db.session() as s:
        first = chain.seal(s, b"k" * 32)
    assert first.sealed == 1  # only what is committed
    slow.commit()
    slow.close()
    with db.session() as s:
        second = chain.seal(s, b"k" * 32)
        report = chain.verify(s, b"k" * 32)
        seqs = {e.id: e.seq for e in s.scalars(select(AuditEvent))}
    assert second.sealed == 1 and seqs == {late_id: 1, early.id: 2}
    assert report.intact and (report.sealed, report.unsealed) == (2, 0)
    db.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_chain_holds_under_concurrent_receive_and_workers(
    daemon_factory, tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """4 storing associations and 2 worker processes while the sealer chains every 0.2 s."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'chain.db'}"
    else:
        url = create_pg_database(
            request.getfixturevalue("pg_server"), f"chain_{os.getpid()}_{free_port()}"
        )
    d = daemon_factory(
        f'\n[database]\nurl = "{url}"\n\n[worker]\nin_process = false\n'
        "\n[audit]\nseal_interval_seconds = 0.2\n"
    )
    d.start()
    workers = [
        WorkerProcess(tmp_path / "workers", url, name=f"w{i}", audit_key=d.root / "audit.key")
        for i in range(2)
    ]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready()
        studies = [ct_study(tmp_path / f"s{i}", 15, size=64, seed=i) for i in range(4)]
        results: list[int] = []
        threads = [
            threading.Thread(target=lambda f=f: results.append(storescu(d.port, f).returncode))
            for f in studies
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [0, 0, 0, 0]
        db = Database(url)

        def all_done() -> bool:
            with db.session() as s:
                jobs = list(s.scalars(select(Job)))
            return len(jobs) == 4 and all(j.state == JobState.DONE for j in jobs)

        wait_for(all_done, 120, "4 jobs done")
        for w in workers:
            w.signal(15)
        assert [w.wait() for w in workers] == [0, 0]
    finally:
        for w in workers:
            w.kill()
    assert d.stop() == 0  # its last act: one more sealing pass
    report = _cli(d.config_path, "audit", "verify")
    assert report.returncode == 0, report.stdout
    assert "intact" in report.stdout and "not sealed yet" not in report.stdout
    with db.session() as s:
        rows = list(s.scalars(select(AuditEvent)))
        types = {e.event_type for e in rows}
    assert all(e.seq is not None for e in rows)
    assert sorted(e.seq for e in rows) == list(range(1, len(rows) + 1))  # type: ignore[type-var]
    assert {EventType.INSTANCE_STORED, EventType.JOB_CLAIMED, EventType.ANALYSIS_RECORDED} <= types
    assert "audit chain sealed" in d.log()
    db.dispose()


def test_db_upgrade_signs_only_rows_from_before_the_trail(tmp_path: Path) -> None:
    """Rows from before the chain are adopted once; a row inserted by hand later never is."""
    from db import migrate

    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    migrate.upgrade(url)
    legacy = Database(url)  # no key: as written before the trail was signed
    old = _write_events(legacy, 2)
    config = _config(tmp_path, url)
    first = _cli(config, "db", "upgrade")
    assert "signed 2 audit row(s) written before the trail was signed" in first.stdout
    signed = Database(url, audit_key=load_key(tmp_path / "audit.key"))
    _write_events(signed, 1)
    with legacy.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO audit_events (at, event_type, actor, detail) "
                "VALUES ('2026-12-01 10:00:00', 'review.decided', 'Smith^Jane', '{}')"
            )
        )
    again = _cli(config, "db", "upgrade")  # as ExecStartPre does at every start
    assert "signed" not in again.stdout
    report = _cli(config, "audit", "verify", "--seal")
    assert report.returncode == 1
    assert "1 problem(s)" in report.stdout and "was not written by secondreader" in report.stdout
    with signed.session() as s:
        sealed = [e.id for e in s.scalars(select(AuditEvent).where(AuditEvent.seq.is_not(None)))]
    assert old[0] in sealed and old[1] in sealed
    legacy.dispose()
    signed.dispose()
