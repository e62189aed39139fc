"""The Prometheus endpoint of a real daemon reflects what it received."""

from __future__ import annotations

import json
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


def test_metrics_count_studies_jobs_and_audit_events(daemon_factory, tmp_path: Path) -> None:
    port = free_port()
    d = daemon_factory(f"{RECEIVE_ONLY}\n[metrics]\nenabled = true\nport = {port}\n").start()
    files = ct_study(tmp_path / "ct", 6, seed=21)
    study_uid = header(files[0]).study_instance_uid
    assert storescu(d.port, files).returncode == 0
    db = DaemonDB.of(d.state)
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


def test_stage_histograms_and_review_decisions_move(daemon_factory, tmp_path: Path) -> None:
    """Received, analysed, reported, delivered, reviewed: each shows in /metrics."""
    from tests.dicomgen import by_sop_instance, storescp
    from tests.test_review_orthanc import demo_ct

    port = free_port()
    with storescp(tmp_path / "pacs") as pacs_port:
        d = daemon_factory(
            f"""
[metrics]
enabled = true
port = {port}

[report]
check_interval_seconds = 0.3

[[delivery.destinations]]
name = "pacs"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {pacs_port}
outputs = ["sr"]
"""
        ).start()
        before = _scrape(port)
        for stage in ("receive_to_complete", "queue_wait", "analysis", "report", "delivery"):
            assert before[(f"secondreader_stage_{stage}_seconds_count", ())] == 0
        assert storescu(d.port, demo_ct(tmp_path / "ct", seed=3)).returncode == 0
        d.wait_for(lambda: "delivered 1 object(s) to pacs" in d.log(), timeout=300)
        assert len(by_sop_instance(tmp_path / "pacs")) == 1
        after = _scrape(port)
        for stage in ("receive_to_complete", "queue_wait", "analysis", "report", "delivery"):
            assert after[(f"secondreader_stage_{stage}_seconds_count", ())] == 1, stage
            inf = (f"secondreader_stage_{stage}_seconds_bucket", (("le", "+Inf"),))
            assert after[inf] == 1
        # The analysis took time; its sum says how much.
        assert after[("secondreader_stage_analysis_seconds_sum", ())] > 0
        run = d.cli("review", "list", "--json").stdout
        run_id = str(json.loads(run)[0]["run_id"])
        d.add_user("smith", "Smith^Jane")
        d.cli("review", "confirm", run_id, "--reviewer", "smith")
        reviewed = _scrape(port)
        confirmed = [
            v for (name, labels), v in reviewed.items()
            if name == "secondreader_review_decisions_total" and ("decision", "confirm") in labels
        ]  # fmt: skip
        assert confirmed == [1]
        assert d.stop() == 0
