"""The Prometheus endpoint of a real daemon reflects what it received."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, storescu
from tests.dicomgen import RECEIVE_ONLY, DaemonDB, ct_study, header


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as rsp:
        text = rsp.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_studies_jobs_and_audit_events(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    d = daemon_factory(f"{RECEIVE_ONLY}\n[metrics]\nenabled = true\nport = {port}\n").start()
    files = ct_study(tmp_path / "ct", 6, seed=21)
    study_uid = header(files[0]).study_instance_uid
    assert storescu(d.port, files).returncode == 0
    db = DaemonDB(f"sqlite:///{d.state / 'secondreader.db'}")
    d.wait_for(lambda: db.complete(study_uid), timeout=30)

    m = _scrape(port)
    assert m[("secondreader_database_up", ())] == 1
    assert m[("secondreader_studies", (("state", "complete"),))] == 1
    assert m[("secondreader_jobs", (("state", "queued"),))] == 1  # the queue depth
    stored = m[("secondreader_audit_events_total", (("event_type", "instance.stored"),))]
    assert stored == len(files)
    accepted = ("secondreader_audit_events_total", (("event_type", "association.accepted"),))
    assert m[accepted] == 1
    # Retention: the disk of the state folder, and nothing removed or stuck yet.
    assert 0 < m[("secondreader_disk_used_ratio", ())] < 1
    assert m[("secondreader_retention_blocked", ())] == 0
    assert m[("secondreader_studies_files_removed", ())] == 0
    assert d.stop() == 0
    db.close()
