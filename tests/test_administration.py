"""An administrator's first week: one audit key, liveness, one-line errors, a move to PostgreSQL.

Real processes (`serve`, `secondreader worker`, the CLI) on real SQLite and
PostgreSQL; every anticipated error is checked for its one line on stderr,
the cause named, and no traceback.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from sqlalchemy import create_engine, func, select

from daemon.accounts import AccountService
from daemon.config import WebConfig, load_config
from daemon.stages.report import Reporter
from daemon.stages.review import ReviewService
from db import chain, migrate
from db.copy import copy_database
from db.models import Base
from db.session import Database
from tests import reportdata as rd
from tests.conftest import REPO, DaemonProcess, create_pg_database, free_port, storescu
from tests.test_config import _clean_env
from tests.test_review_orthanc import demo_ct


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The error's single line; fails on a traceback or more lines."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def _run(d: DaemonProcess, *args: str, config: Path | None = None,
         env: dict[str, str] | None = None, stdin: int | None = None,
         ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = env or {**d.env, "SECONDREADER_CONFIG": str(config or d.config_path)}
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, stdin=stdin)  # fmt: skip


def test_a_process_with_another_audit_key_stops_and_the_trail_stays_clean(
    daemon_factory,
    tmp_path: Path,
) -> None:
    d = daemon_factory()
    d.cli("db", "upgrade")
    d.add_user("smith", "Smith^Jane")  # a signed audit row
    # The same settings, from another folder: its audit.key is elsewhere.
    other = tmp_path / "elsewhere" / "secondreader.toml"
    other.parent.mkdir()
    shutil.copy(d.config_path, other)
    missing = _one_line(_run(d, "worker", config=other))
    assert "audit key" in missing and "not found" in missing
    # db upgrade does not make a new key for a database whose rows are signed.
    refused = _one_line(_run(d, "db", "upgrade", config=other))
    assert "is missing" in refused and "copy audit.key" in refused
    assert not (other.parent / "audit.key").exists()
    # Another key: the worker stops with both fingerprints, before writing anything.
    chain.create_key(other.parent / "audit.key")
    wrong = _one_line(_run(d, "worker", config=other))
    assert "fingerprint" in wrong and "not this database's" in wrong
    verify = d.cli("audit", "verify", "--seal")
    assert "intact" in verify.stdout, verify.stdout
    # The right key copied over: the worker starts (and stops on SIGTERM).
    shutil.copy(d.config_path.parent / "audit.key", other.parent / "audit.key")
    worker = subprocess.Popen([sys.executable, "-m", "daemon.cli", "worker"], cwd=REPO,
                              env={**d.env, "SECONDREADER_CONFIG": str(other)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)  # fmt: skip
    assert worker.stdout is not None
    for line in worker.stdout:
        if "worker ready" in line:
            break
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0
    assert "intact" in d.cli("audit", "verify", "--seal").stdout


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_jobs_without_a_live_worker_raise_the_alarm_until_one_runs(
    daemon_factory, tmp_path: Path
) -> None:
    metrics = free_port()
    d = daemon_factory(
        f"\n[worker]\nin_process = false\nliveness_seconds = 1\nno_worker_alert_seconds = 1\n"
        f"\n[metrics]\nenabled = true\nport = {metrics}\n"
    ).start()
    site = f"http://127.0.0.1:{metrics}"
    assert _get(f"{site}/healthz") == (200, "ok\n")
    assert _get(f"{site}/nothing")[0] == 404  # only /metrics and /healthz here
    assert storescu(d.port, demo_ct(tmp_path / "ct", seed=3)).returncode == 0
    # The study completes, its job waits, no worker lives: 503, a warning, a metric.
    d.wait_for(lambda: _get(f"{site}/healthz")[0] == 503, timeout=60)
    status = d.cli("status").stdout
    assert "WARNING: 1 job(s) queued" in status and "no worker is running" in status
    assert "serve" in status and "running" in status
    assert "secondreader_worker_missing 1.0" in _get(f"{site}/metrics")[1]
    d.wait_for(lambda: "no worker is running" in d.log(), timeout=30)
    worker = subprocess.Popen([sys.executable, "-m", "daemon.cli", "worker"], cwd=REPO,
                              env=d.env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        d.wait_for(lambda: _get(f"{site}/healthz")[0] == 200, timeout=120)
        report = json.loads(d.cli("status", "--json").stdout)
        assert report["warnings"] == []
        kinds = {(p["kind"], p["alive"]) for p in report["processes"]}
        assert ("worker", True) in kinds and ("serve", True) in kinds
        assert 'secondreader_process_up{kind="worker"' in _get(f"{site}/metrics")[1]
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    stopped = json.loads(d.cli("status", "--json").stdout)["processes"]
    assert any(p["kind"] == "worker" and p["stopped"] for p in stopped)
    assert d.stop() == 0


def test_every_anticipated_error_is_one_line(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory()
    d.cli("db", "upgrade")
    # A port in use: which port, and which part of us wanted it.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", d.port))
        taken.listen()
        line = _one_line(_run(d, "serve"))
    assert f"port {d.port}" in line and "DICOM receiver" in line and "scp.port" in line
    web = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", web))
        taken.listen()
        bad = d.root / "web.toml"  # beside the audit key
        bad.write_text(d.config_path.read_text() + f"\n[web]\nenabled = true\nport = {web}\n")
        line = _one_line(_run(d, "serve", config=bad))
    assert f"port {web}" in line and "web page" in line
    # An unreachable database: the driver's reason, host and port.
    gone = free_port()
    line = _one_line(_run(d, "status", env={
        **_clean_env(), "SECONDREADER_DATABASE__URL": f"postgres://u@127.0.0.1:{gone}/x"}))
    assert "cannot reach the database" in line and str(gone) in line
    # A password asked for with no terminal to ask on.
    line = _one_line(_run(d, "user", "add", "jones", stdin=subprocess.DEVNULL))
    assert "--password-stdin" in line
    # A PACS that refuses the connection is not "aborted".
    echo = _run(d, "echo", "--host", "127.0.0.1", "--port", str(free_port()), "--aet", "PACS")
    assert echo.returncode == 1 and "refused the connection" in echo.stderr
    # An unknown study in the audit export.
    export = _run(d, "audit", "export", "--study", "1.2.3.4")
    assert export.returncode == 1 and "no audit events for study 1.2.3.4" in export.stderr
    # A reader that goes away: no BrokenPipeError.
    piped = subprocess.Popen([sys.executable, "-m", "daemon.cli", "audit", "export"], cwd=REPO,
                             env=d.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert piped.stdout is not None and piped.stderr is not None
    piped.stdout.close()
    piped.wait(60)
    assert b"Traceback" not in piped.stderr.read()
    # What demo's options mean.
    assert "number of axial slices" in _run(d, "demo", "--help").stdout


def _reviewed_sqlite(tmp_path: Path) -> tuple[Path, str, bytes]:
    """A SQLite database with a result, its reviewed SR, accounts and a sealed trail."""
    path = tmp_path / "secondreader.toml"
    path.write_text(f'[storage]\nstate_dir = "{tmp_path / "state"}"\nfsync = false\n'
                    '[[delivery.destinations]]\nname = "pacs"\nae_title = "PACS"\n'
                    'host = "127.0.0.1"\nport = 11112\n')  # fmt: skip
    config = load_config(path, environ={})
    config.storage.state_dir.mkdir(parents=True)
    migrate.upgrade(config.database_url)
    key = bytes(range(32))
    db = Database(config.database_url, audit_key=key)
    AccountService(db, WebConfig()).add("smith", "correct horse battery", "reviewer", "test",
                                        full_name="Smith^Jane")  # fmt: skip
    files = rd.ct_study(tmp_path / "ct")
    study_uid = rd.receive(db, config.storage.spool_dir, files)
    rd.record_analysis(db, config.storage.state_dir, study_uid, [rd.analysed(files)])
    assert Reporter(db, config).run_once() == 1
    reviews = ReviewService(db, config)
    (result,) = reviews.results()
    assert reviews.decide(result.run_id, "confirm", reviews.reviewer("Smith^Jane"))
    with db.session() as s:
        chain.seal(s, key)
    db.dispose()
    return path, config.database_url, key


def test_db_copy_to_postgresql_keeps_every_row_and_the_trail(
    tmp_path: Path, pg_server: str
) -> None:
    _config, source, key = _reviewed_sqlite(tmp_path)
    target = create_pg_database(pg_server, "copied")
    counts = copy_database(source, target)
    engines = create_engine(source), create_engine(target)
    try:
        for table in Base.metadata.sorted_tables:
            n = [e.connect().execute(select(func.count()).select_from(table)).scalar()
                 for e in engines]  # fmt: skip
            assert n[0] == n[1] == counts[table.name], table.name
    finally:
        for e in engines:
            e.dispose()
    assert counts["finding_decisions"] == 1 and counts["users"] == 1
    db = Database(target, audit_key=key)
    with db.session() as s:
        report = chain.verify(s, key)
    assert report.intact and report.sealed > 0, report.problems
    # New rows on PostgreSQL continue after the copied ids, and sign and chain on.
    AccountService(db, WebConfig()).add("doe", "correct horse battery", "reviewer", "test")
    with db.session() as s:
        chain.seal(s, key)
        assert chain.verify(s, key).intact
    db.dispose()
    # The target is not empty any more: a second copy is refused, nothing written.
    again = subprocess.run([sys.executable, "-m", "daemon.cli", "db", "copy", "--from", source,
                            "--to", target.replace("postgresql+psycopg://", "postgres://")],
                           cwd=REPO, env=_clean_env(), capture_output=True, text=True)  # fmt: skip
    assert _one_line(again) and "already holds rows" in again.stderr


def test_a_database_behind_the_code_says_db_upgrade(daemon_factory) -> None:
    d = daemon_factory()
    d.state.mkdir(parents=True)
    migrate.upgrade(f"sqlite:///{d.state / 'secondreader.db'}", "0009")  # an older install
    line = _one_line(_run(d, "status"))
    assert "revision 0009" in line and "secondreader db upgrade" in line
    assert d.cli("db", "upgrade").returncode == 0
    assert d.cli("status").returncode == 0


def test_a_heartbeat_stands_for_its_part_only_while_that_works(tmp_path: Path) -> None:
    from daemon.liveness import Heartbeat
    from db.liveness import processes

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate.upgrade(url)
    db = Database(url)
    working = {"models loaded": False}
    beat = Heartbeat(db, "worker", 60, alive=lambda: working["models loaded"])
    beat.beat()  # a worker whose models failed to load: no beat, so no live worker
    with db.session() as s:
        assert processes(s) == []
    working["models loaded"] = True
    beat.beat()
    with db.session() as s:
        assert [p.kind for p in processes(s)] == ["worker"]
    db.dispose()
