"""Helpers of the queue and worker tests: real `secondreader worker` processes, queued jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from db.chain import create_key
from db.ingest import StoredInstance, record_instance
from db.models import utcnow
from db.session import Database
from db.studies import complete_stable_studies

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def queue_studies(db: Database, n: int, prefix: str = "1.2.826.0.1.3680043.10.9999") -> list[str]:
    """`n` studies of one instance each, received and completed: `n` queued jobs."""
    past = utcnow() - timedelta(seconds=60)
    uids = [f"{prefix}.{i + 1}" for i in range(n)]
    with db.session() as s:
        for uid in uids:
            record_instance(
                s,
                StoredInstance(
                    study_instance_uid=uid,
                    series_instance_uid=f"{uid}.1",
                    sop_instance_uid=f"{uid}.1.1",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    modality="CT",
                    path=f"{uid}/{uid}.1/{uid}.1.1.dcm",
                    size_bytes=1,
                    calling_ae="TEST",
                ),
                now=past,
            )
    with db.session() as s:
        done = complete_stable_studies(s, stable_seconds=1, max_seconds=3600)
    assert len(done) == n
    return uids


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s")


class WorkerProcess:
    """`secondreader worker` with a stand-in analyser (tests/analysers.py)."""

    def __init__(
        self,
        root: Path,
        db_url: str,
        *,
        name: str,
        worker: dict[str, object] | None = None,
        env: dict[str, str] | None = None,
        audit_key: Path | None = None,
    ) -> None:
        """`audit_key`: the key of the daemon the worker joins; else one of its own."""
        self.name = name
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        settings: dict[str, object] = {
            "analyser": "tests.analysers:recording",
            "poll_seconds": 0.1,
            "lease_seconds": 2,
            "heartbeat_seconds": 0.4,
            "retry_backoff_seconds": 0,
            "stop_seconds": 30,
            **(worker or {}),
        }
        if audit_key is None:
            audit_key = root / "audit.key"
            create_key(audit_key)
        lines = [
            f'[storage]\nstate_dir = "{root / "state"}"\n',
            f'[database]\nurl = "{db_url}"\n',
            f'[audit]\nkey_file = "{audit_key}"\n',
        ]
        lines.append("[worker]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in settings.items()))
        self.config_path = root / f"{name}.toml"
        self.config_path.write_text("\n".join(lines))
        self.log_path = root / f"{name}.log"
        self.env = {**os.environ, "SECONDREADER_CONFIG": str(self.config_path), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "worker"],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited early:\n{self.log()}")
            return "secondreader worker ready" in self.log()

        wait_for(ready, timeout, f"worker {self.name} ready")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return f'"{v}"'
