"""Model governance end to end: a silent trial, promotion, review-only, with Orthanc as the PACS.

The built-in CT model starts silent (`monitoring.default_mode`): its result
is recorded and observed, but nothing reaches Orthanc or the worklist. An
admin promotes it with a reason; the next study's SR reaches Orthanc, and
the promotion is in the audit trail with its evidence. In review-only mode
the reader sees the result and signs it, and still nothing reaches the PACS.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from db.models import AnalysisRun, AuditEvent, OutboxItem, ReportState, RunObservation, Study
from tests.conftest import storescu
from tests.orthanc import Orthanc
from tests.test_orthanc import open_db
from tests.test_review_orthanc import delivery, demo_ct, result_of, srs_in_orthanc

CT = ("secondreader-demo-nodule-ct", "1.1.0")


def _run(db, study_uid: str) -> AnalysisRun | None:
    with db.session() as s:
        s.expire_on_commit = False
        return s.scalar(
            select(AnalysisRun)
            .join(Study, Study.id == AnalysisRun.study_id)
            .where(Study.study_instance_uid == study_uid, AnalysisRun.model_name == CT[0])
            .order_by(AnalysisRun.id.desc())
        )


def _send(d, folder: Path, seed: int) -> str:
    files = demo_ct(folder, seed)
    r = storescu(d.port, files)
    assert r.returncode == 0, r.stderr
    return str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _listed(d, study_uid: str) -> bool:
    rows = json.loads(d.cli("review", "list", "--state", "all", "--json").stdout)
    return any(r["study_instance_uid"] == study_uid for r in rows)


def test_silent_trial_then_live_then_review_only(
    tmp_path: Path, daemon_factory, orthanc_factory
) -> None:
    orthanc: Orthanc = orthanc_factory().start()
    config = delivery(orthanc) + '\n[monitoring]\ndefault_mode = "silent"\n'
    d = daemon_factory(config).start()
    db = open_db(d)
    d.add_user("boss", "Boss^Ada", role="admin")
    d.add_user("smith", "Smith^Jane")

    # Silent: recorded and observed; nothing in Orthanc, the outbox or the worklist.
    silent_uid = _send(d, tmp_path / "silent", 3)
    run = d.wait_for(lambda: (r := _run(db, silent_uid)) and r.report_state != "pending" and r,
                     timeout=300, interval=0.5)  # fmt: skip
    assert (run.report_state, run.mode) == (ReportState.WITHHELD, "silent")
    with db.session() as s:
        observation = s.get(RunObservation, run.id)
        assert observation is not None and observation.manufacturer
        assert observation.noise is not None and observation.p99 is not None
        assert s.scalars(select(OutboxItem).where(OutboxItem.run_id == run.id)).all() == []
    assert not _listed(d, silent_uid)
    assert orthanc.study_instances(silent_uid) == []
    modes = d.cli("model", "modes").stdout
    assert f"{CT[0]} {CT[1]}: silent (default)" in modes, modes

    # Only an admin, with a reason, promotes; the evidence goes with it.
    refused = d.cli("model", "mode", *CT, "live", "--reason", "ok", "--by", "smith", check=False)
    assert refused.returncode == 2 and "admin" in refused.stderr
    out = d.cli("model", "mode", *CT, "live", "--by", "boss",
                "--reason", "silent trial reviewed by the AI committee")  # fmt: skip
    assert "live from its next result on" in out.stdout
    live_uid = _send(d, tmp_path / "live", 4)
    srs_in_orthanc(orthanc, live_uid, 1, d)
    assert _listed(d, live_uid)
    assert orthanc.study_instances(silent_uid) == []  # what was withheld stays withheld

    with db.session() as s:
        changed = AuditEvent.event_type == "model.mode_changed"
        (event,) = s.scalars(select(AuditEvent).where(changed))
        detail = event.detail
    assert event.actor == "boss"
    assert detail["reason"] == "silent trial reviewed by the AI committee"
    assert (detail["previous"], detail["mode"]) == ("silent", "live")
    assert detail["evidence"]["runs"] >= 1
    assert d.cli("audit", "verify").returncode == 0

    # Review-only: the reader sees it and signs; the PACS gets neither SR.
    d.cli("model", "mode", *CT, "review-only", "--by", "boss", "--reason", "threshold change")
    review_uid = _send(d, tmp_path / "review-only", 5)
    result = result_of(d, review_uid)
    out = d.cli("review", "confirm", str(result["run_id"]), "--reviewer", "smith")
    assert "verified SR" in out.stdout, out.stdout + out.stderr
    # The live study's objects are delivered meanwhile: the deliver stage is running.
    srs_in_orthanc(orthanc, live_uid, 1, d)
    run = _run(db, review_uid)
    assert run is not None and run.mode == "review-only"
    with db.session() as s:
        assert s.scalars(select(OutboxItem).where(OutboxItem.run_id == run.id)).all() == []
    assert orthanc.study_instances(review_uid) == []
    page = d.cli("model", "monitor", *CT).stdout
    assert "mode review-only" in page and "threshold change" in page, page
