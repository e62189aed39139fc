"""Hand-offs without polling: each stage wakes the next (daemon/scheduler.py).

The report and deliver stages' intervals and the worker's poll are set to an
hour, so their own ticks never come during the test: the SR can only reach
the PACS (dcmtk's storescp) because completing the study woke the worker,
the recorded run woke the report stage, and the queued SR woke delivery.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, create_pg_database, storescu
from tests.dicomgen import by_sop_instance, storescp
from tests.reportdata import ct_study

HOUR = 3600


def slow_ticks(pacs_port: int, extra: str = "", *, in_process: bool = True) -> str:
    """The worker's poll and the report and deliver ticks an hour apart; the SR to storescp."""
    return f"""{extra}
[worker]
in_process = {str(in_process).lower()}
poll_seconds = {HOUR}

[report]
check_interval_seconds = {HOUR}

[delivery]
check_interval_seconds = {HOUR}

[[delivery.destinations]]
name = "pacs"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {pacs_port}
outputs = ["sr"]
"""


def test_each_stage_wakes_the_next(daemon_factory, tmp_path: Path) -> None:
    with storescp(tmp_path / "pacs") as pacs_port:
        d = daemon_factory(slow_ticks(pacs_port)).start()
        files = ct_study(tmp_path / "ct", slices=12, size=64)
        assert storescu(d.port, files).returncode == 0
        # Logged once storescp answered, so its file is whole by then.
        d.wait_for(lambda: "delivered 1 object(s) to pacs" in d.log(), timeout=120)
        received = by_sop_instance(tmp_path / "pacs")
        assert len(received) == 1  # the SR (analysed or not-run: either way reported)
        assert "job 1 claimed" in d.log()
        assert d.stop() == 0


def test_processes_wake_each_other_through_postgresql(
    daemon_factory, pg_server: str, tmp_path: Path
) -> None:
    """serve completes, a `secondreader worker` process analyses: NOTIFY carries both hand-offs.

    The worker's poll and serve's report interval are an hour: only LISTEN /
    NOTIFY (db/notify.py) can bring the job to the worker and its run back.
    """
    url = create_pg_database(pg_server, "handoff")
    with storescp(tmp_path / "pacs") as pacs_port:
        config = slow_ticks(pacs_port, f'[database]\nurl = "{url}"\n', in_process=False)
        d = daemon_factory(config).start()
        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "worker"], cwd=REPO, env=d.env,
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            d.wait_for(lambda: b"worker ready" in (tmp_path / "worker.log").read_bytes(), 120)
            files = ct_study(tmp_path / "ct", slices=12, size=64)
            assert storescu(d.port, files).returncode == 0
            d.wait_for(lambda: "delivered 1 object(s) to pacs" in d.log(), timeout=120)
            assert len(by_sop_instance(tmp_path / "pacs")) == 1
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=60) == 0
        assert "job 1 claimed" in (tmp_path / "worker.log").read_text()
        assert d.stop() == 0
