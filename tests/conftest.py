"""Shared fixtures: a real daemon process, real dcmtk tools, real PostgreSQL.

Nothing here skips: a missing peer (dcmtk, PostgreSQL) fails the test run,
because in CI a skipped test is a failure anyway and a mock is not a peer.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The orthanc_factory fixture, loaded as a plugin (asserts rewritten) for every module.
pytest_plugins = ["tests.orthanc"]
PG_BIN = Path("/usr/lib/postgresql")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (Debian package needed; .ci/run installs it)")
    return path


def dcmtk_env() -> dict[str, str]:
    # Without TCP_NODELAY, Nagle's algorithm dominates dcmtk's loopback timings.
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(
    port: int,
    files: list[Path],
    *,
    aet: str = "STORESCU",
    aec: str = "SECONDREADER",
    extra: list[str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    cmd = [
        require_tool("storescu"),
        "-aet",
        aet,
        "-aec",
        aec,
        *(extra or []),
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    # errors="replace": dcmtk echoes undecodable bytes of a damaged file in its messages.
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        env=dcmtk_env(),
    )


USER_PASSWORD = "correct horse battery"  # accounts that tests add


class DaemonProcess:
    """`secondreader serve` as a real subprocess with its own state folder."""

    def __init__(self, root: Path, config_text: str = "", env: dict[str, str] | None = None):
        self.root = root
        self.port = free_port()
        self.state = root / "state"
        self.config_path = root / "secondreader.toml"
        self.config_path.write_text(
            f"""
[scp]
host = "127.0.0.1"
port = {self.port}

[storage]
state_dir = "{self.state}"

[completion]
stable_seconds = 2
check_interval_seconds = 0.5
"""
            + config_text
        )
        self.env = {**os.environ, "SECONDREADER_CONFIG": str(self.config_path), **(env or {})}
        self.log_path = root / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            input=input,
        )

    def add_user(self, username: str, full_name: str, role: str = "reviewer") -> None:
        """An account, as an administrator adds one (the database must be migrated)."""
        self.cli("user", "add", username, "--full-name", full_name, "--role", role,
                 "--password-stdin", input=USER_PASSWORD + "\n")  # fmt: skip

    def start(self, timeout: float = 60) -> DaemonProcess:
        self.cli("db", "upgrade")
        # On a restart the log already holds the last run's "ready": look past it.
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "serve"],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited early:\n{self.log_path.read_text()}")
            if b"secondreader ready" in self.log_path.read_bytes()[offset:]:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"daemon not ready in {timeout} s:\n{self.log_path.read_text()}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        self.proc = None
        return rc

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, predicate, timeout: float = 60, interval: float = 0.2):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"condition not met in {timeout} s; daemon log:\n{self.log()[-4000:]}")


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator:
    started: list[DaemonProcess] = []

    def make(
        config_text: str = "", env: dict[str, str] | None = None, name: str = "d"
    ) -> DaemonProcess:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        d = DaemonProcess(root, config_text, env)
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc is not None:
            d.kill()


# -- PostgreSQL -------------------------------------------------------------


def _pg_bindir() -> Path:
    versions = sorted(PG_BIN.glob("*/bin/initdb"))
    if not versions:
        pytest.fail("PostgreSQL server is not installed (Debian package postgresql)")
    return versions[-1].parent


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on loopback; yields a base URL without database.

    `SECONDREADER_TEST_PG_URL` points the tests at an existing server instead.
    """
    if os.environ.get("SECONDREADER_TEST_PG_URL"):
        yield os.environ["SECONDREADER_TEST_PG_URL"].rsplit("/", 1)[0]
        return
    bindir = _pg_bindir()
    data = tmp_path_factory.mktemp("pg") / "data"
    run_as: list[str] = []
    if os.geteuid() == 0:
        # The server refuses to run as root: hand its folder to the postgres user.
        shutil.chown(data.parent, "postgres")
        os.chmod(data.parent, 0o755)
        run_as = ["runuser", "-u", "postgres", "--"]
        for parent in data.parents:
            if parent == Path("/"):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o011)
    port = free_port()
    subprocess.run(
        [
            *run_as,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *run_as,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-l",
            str(data.parent / "pg.log"),
            "-o",
            f"-p {port} -k {data.parent} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
            capture_output=True,
        )


def create_pg_database(base_url: str, name: str) -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(f"{base_url}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{base_url}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database on each backend."""
    from db import migrate

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.db'}"
    else:
        base = request.getfixturevalue("pg_server")
        url = create_pg_database(base, f"t_{os.getpid()}_{free_port()}")
    migrate.upgrade(url)
    return url


# -- CI: a skipped test is a failure ----------------------------------------


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    if os.environ.get("CI") and skipped:
        terminalreporter.write_line(
            f"CI: {len(skipped)} test(s) skipped; failing the run", red=True
        )


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("CI") and skipped and session.exitstatus == 0:
        session.exitstatus = 1
