"""Physician review through the service layer: decisions, verified SRs, amendments,
release policy and agreement statistics.

The results are recorded and reported by the stages' own code
(tests/reportdata.py, the real Reporter); each verified SR is read back and
checked by dciodvfy. The end-to-end path through Orthanc and the CLI is in
tests/test_review_orthanc.py.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from daemon.config import DEFAULT_OUTPUTS, Config
from daemon.stages.report import Reporter
from daemon.stages.review import Correction, Reviewer, ReviewError, ReviewService
from db import audit, chain, migrate
from db.audit import EventType
from db.models import AnalysisRun, DeliveryState, FindingDecision, OutboxItem
from db.session import Database
from dicom_io.sr import read_findings
from tests import reportdata as rd
from tests.configs import write_config
from tests.dicom_validate import dciodvfy_errors
from tests.dicomgen import PATIENT_ID, PATIENT_NAME

KEY = bytes(range(32))


def make_config(tmp_path: Path, db_url: str, destinations: str = "") -> Config:
    review = """
[review]
organization = "Test Hospital Radiology"
"""
    return write_config(tmp_path, db_url, review + destinations)


PACS = """
[[delivery.destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 11112
"""


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'review.db'}"
    migrate.upgrade(url)
    return url


def reported_result(db: Database, config: Config, folder: Path, *, probability: float = 0.87):
    files = rd.ct_study(folder, seed=sum(folder.name.encode()))
    study_uid = rd.receive(db, config.storage.spool_dir, files)
    result = rd.analysed(files, probability=probability)
    rd.record_analysis(db, config.storage.state_dir, study_uid, [result])
    assert Reporter(db, config).run_once() == 1
    return files, study_uid


def outbox(db: Database) -> list[OutboxItem]:
    with db.session() as s:
        return list(s.scalars(select(OutboxItem).order_by(OutboxItem.id)))


def verified_file(config: Config, study_uid: str, uid: str) -> Path:
    return config.storage.state_dir / "outbox" / study_uid / f"{uid}.dcm"


def test_confirm_builds_a_verified_sr_for_every_destination(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = make_config(tmp_path, sqlite_url, PACS)
    db = Database(config.database_url, audit_key=KEY)
    _files, study_uid = reported_result(db, config, tmp_path / "a")
    service = ReviewService(db, config)
    (result,) = service.results()
    assert result.state == "pending" and len(result.findings) == 1

    uid = service.decide(
        result.run_id, "confirm", service.reviewer("Smith^Jane"), comment="Solid nodule."
    )
    assert uid is not None
    path = verified_file(config, study_uid, uid)
    sr = dcmread(path)
    assert (sr.VerificationFlag, sr.CompletionFlag) == ("VERIFIED", "COMPLETE")
    assert sr.PreliminaryFlag == "FINAL"
    (observer,) = sr.VerifyingObserverSequence
    assert str(observer.VerifyingObserverName) == "Smith^Jane"
    assert observer.VerifyingOrganization == "Test Hospital Radiology"
    (pred,) = sr.PredecessorDocumentsSequence
    ref = pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == result.ai_sr_sop_instance_uid
    (finding,) = read_findings(sr)
    assert finding["present"] is True and finding["graphic_data"] is not None
    assert "confirmed" in (finding["comment"] or "")
    assert "Smith^Jane (Test Hospital Radiology): Solid nodule." in (finding["comment"] or "")
    assert dciodvfy_errors(path) == []
    verified = [i for i in outbox(db) if i.object_kind == "verified-sr"]
    assert [(i.destination, i.state, i.sop_instance_uid) for i in verified] == [
        ("pacs", DeliveryState.PENDING, uid)
    ]
    (after,) = service.results(state="verified")
    assert after.run_id == result.run_id
    assert service.results() == []  # nothing pending
    with db.session() as s:
        events = audit.events(s)
        types = [e.event_type for e in events]
        assert EventType.REVIEW_DECIDED in types and EventType.VERIFIED_SR_CREATED in types
        # Signed as written: the chain seals them.
        assert chain.seal(s, KEY).skipped == 0
    # UIDs only in the trail: no patient name or ID, and not the free-text comment.
    trail = " ".join(json.dumps(e.detail) + e.actor for e in events)
    for value in (PATIENT_NAME, PATIENT_ID, "Solid nodule"):
        assert value not in trail
    db.dispose()


def test_a_decided_result_is_changed_only_by_an_amendment(tmp_path: Path, sqlite_url: str) -> None:
    config = make_config(tmp_path, sqlite_url, PACS)
    db = Database(config.database_url)
    _files, study_uid = reported_result(db, config, tmp_path / "a")
    service = ReviewService(db, config)
    (result,) = service.results()
    first = service.decide(result.run_id, "confirm", service.reviewer("Smith^Jane"))
    assert first is not None

    with pytest.raises(ReviewError, match="an amendment, with a reason"):
        service.decide(result.run_id, "reject", service.reviewer("Doe^John"))
    with pytest.raises(ReviewError, match="says why"):
        service.amend(result.run_id, 1, "reject", service.reviewer("Doe^John"), reason=" ")

    second = service.amend(
        result.run_id,
        1,
        "reject",
        service.reviewer("Doe^John"),
        reason="Second read: vessel seen end-on, not a nodule",
    )
    assert second is not None and second != first
    sr = dcmread(verified_file(config, study_uid, second))
    ref = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first  # supersedes the first verified SR
    (finding,) = read_findings(sr)
    # Rejected: stated absent, the whole key image as region (no spot; OHIF needs one).
    assert finding["present"] is False
    assert finding["graphic_data"] == [(0.0, 0.0), (64.0, 0.0), (64.0, 64.0), (0.0, 64.0),
                                       (0.0, 0.0)]  # fmt: skip
    assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == "Doe^John"
    assert dciodvfy_errors(verified_file(config, study_uid, second)) == []
    (amended,) = service.results(state="amended")
    assert [v.reason for v in amended.verifications] == [
        None,
        "Second read: vessel seen end-on, not a nodule",
    ]
    with db.session() as s:
        (event,) = audit.events(s, EventType.REVIEW_AMENDED)
        assert (event.actor, event.detail["round"], event.detail["decision"]) == (
            "Doe^John",
            2,
            "reject",
        )
    db.dispose()


def test_correction_draws_the_region_at_the_new_location(tmp_path: Path, sqlite_url: str) -> None:
    config = make_config(tmp_path, sqlite_url)
    db = Database(config.database_url)
    files, study_uid = reported_result(db, config, tmp_path / "a")
    other = dcmread(files[1], stop_before_pixels=True)
    service = ReviewService(db, config)
    (result,) = service.results()
    with pytest.raises(ReviewError, match="names its finding"):
        service.decide(result.run_id, "correct", service.reviewer("Smith^Jane"))

    uid = service.decide(
        result.run_id,
        "correct",
        service.reviewer("Smith^Jane"),
        finding=1,
        correction=Correction(str(other.SOPInstanceUID), box=(10.0, 12.0, 22.0, 26.0)),
    )
    assert uid is not None
    path = verified_file(config, study_uid, uid)
    (finding,) = read_findings(dcmread(path))
    assert finding["present"] is True
    assert finding["referenced_sop_instance_uid"] == other.SOPInstanceUID
    assert finding["graphic_data"] == [(10, 12), (22, 12), (22, 26), (10, 26), (10, 12)]
    assert "corrected the location" in (finding["comment"] or "")
    assert dciodvfy_errors(path) == []
    db.dispose()


@pytest.mark.parametrize("send_ai", [False, True])
def test_after_review_holds_the_ai_objects_until_the_decision(
    tmp_path: Path, sqlite_url: str, send_ai: bool
) -> None:
    config = make_config(
        tmp_path,
        sqlite_url,
        PACS
        + f"""release = "after_review"
send_ai_result_after_review = {str(send_ai).lower()}

[[delivery.destinations]]
name = "archive"
ae_title = "ARCHIVE"
host = "127.0.0.1"
port = 11113
""",
    )
    db = Database(config.database_url)
    reported_result(db, config, tmp_path / "a")
    held = {(i.destination, i.object_kind): i.state for i in outbox(db)}
    # Every AI object of the default outputs (SR, parametric map, GSPS, summary);
    # "regions", a segmentation model's SEG, is no classifier's.
    kinds = [kind for kind in DEFAULT_OUTPUTS if kind != "regions"]
    assert held == {
        **{("pacs", kind): DeliveryState.HELD for kind in kinds},
        # immediate: today's behaviour
        **{("archive", kind): DeliveryState.PENDING for kind in kinds},
    }
    service = ReviewService(db, config)
    (result,) = service.results()
    service.decide(result.run_id, "reject", service.reviewer("Smith^Jane"))
    after = {(i.destination, i.object_kind): i.state for i in outbox(db)}
    ai_state = DeliveryState.PENDING if send_ai else DeliveryState.WITHHELD
    assert after == {
        **{("pacs", kind): ai_state for kind in kinds},
        **{("archive", kind): DeliveryState.PENDING for kind in kinds},
        ("pacs", "verified-sr"): DeliveryState.PENDING,
        ("archive", "verified-sr"): DeliveryState.PENDING,
    }
    with db.session() as s:
        assert len(audit.events(s, EventType.RELEASE_HELD)) == len(kinds)
        event = EventType.RELEASE_RELEASED if send_ai else EventType.RELEASE_WITHHELD
        assert len(audit.events(s, event)) == len(kinds)
    db.dispose()


def test_objects_built_after_the_decision_follow_its_release(
    tmp_path: Path, sqlite_url: str
) -> None:
    """The physician decides between the report's two passes: the map, GSPS and
    summary built after it are withheld at once, not held for a review that is over."""
    config = make_config(
        tmp_path,
        sqlite_url,
        PACS + 'release = "after_review"\nsend_ai_result_after_review = false\n',
    )
    db = Database(config.database_url, audit_key=KEY)
    files = rd.ct_study(tmp_path / "a", seed=7)
    study_uid = rd.receive(db, config.storage.spool_dir, files)
    rd.record_analysis(db, config.storage.state_dir, study_uid, [rd.analysed(files)])
    reporter = Reporter(db, config)
    with db.session() as s:
        (run_id,) = s.scalars(select(AnalysisRun.id)).all()
    assert reporter.report(run_id)  # the first pass alone: the SR, held
    assert {(i.object_kind, i.state) for i in outbox(db)} == {("sr", DeliveryState.HELD)}
    service = ReviewService(db, config)
    service.decide(run_id, "confirm", service.reviewer("Smith^Jane"))
    assert reporter.report_extras(run_id)
    states = {i.object_kind: i.state for i in outbox(db)}
    assert states == {
        "sr": DeliveryState.WITHHELD,
        "verified-sr": DeliveryState.PENDING,
        "pmap": DeliveryState.WITHHELD,
        "gsps": DeliveryState.WITHHELD,
        "summary": DeliveryState.WITHHELD,
    }
    db.dispose()


def test_stats_match_a_hand_count(tmp_path: Path, sqlite_url: str) -> None:
    """10 results, mixed decisions (one amended), over two weeks."""
    config = make_config(tmp_path, sqlite_url)
    db = Database(config.database_url)
    service = ReviewService(db, config)
    plan = [
        # (probability: present if >= 0.5, decision)
        (0.9, "confirm"),
        (0.8, "confirm"),
        (0.7, "reject"),
        (0.95, "correct"),
        (0.6, "confirm"),
        (0.3, "confirm"),  # absent, confirmed absent
        (0.2, "reject"),  # absent, but the physician sees it
        (0.85, "reject"),
        (0.75, "confirm"),  # amended below to reject
        (0.65, "correct"),
    ]
    runs = []
    for i, (p, decision) in enumerate(plan):
        files, _ = reported_result(db, config, tmp_path / f"s{i}", probability=p)
        (result,) = [r for r in service.results() if abs(r.findings[0].probability - p) < 1e-9]
        kwargs = {}
        if decision == "correct":
            kwargs = {
                "finding": 1,
                "correction": Correction(str(dcmread(files[0]).SOPInstanceUID), point=(5, 5)),
            }
        service.decide(result.run_id, decision, service.reviewer("Smith^Jane"), **kwargs)
        runs.append(result.run_id)
    service.amend(runs[8], 1, "reject", service.reviewer("Doe^John"), reason="second read")
    # The first five decisions a week earlier: two weekly rows.
    with db.session() as s:
        for d in s.scalars(select(FindingDecision).where(FindingDecision.run_id.in_(runs[:5]))):
            d.decided_at = d.decided_at - timedelta(days=7)

    rows = {r.period: r for r in service.stats()}
    assert len(rows) == 3 and list(rows)[-1] == "overall"
    overall = rows["overall"]
    # Hand count, latest decision per finding: confirm 0,1,4,5 = 4; reject 2,6,7,8 = 4;
    # correct 3,9 = 2. Present (p >= 0.5): 0,1,2,3,4,7,8,9 = 8; upheld: 0,1,3,4,9 = 5.
    assert (overall.confirmed, overall.rejected, overall.corrected) == (4, 4, 2)
    assert (overall.present_decided, overall.present_upheld) == (8, 5)
    assert overall.ppv == pytest.approx(5 / 8)
    assert overall.agreement == pytest.approx(4 / 10)
    early, late = [rows[k] for k in list(rows)[:2]]
    assert (early.confirmed, early.rejected, early.corrected) == (3, 1, 1)
    assert (late.confirmed, late.rejected, late.corrected) == (1, 3, 1)
    assert {r.model for r in rows.values()} == {f"{rd.ALGORITHM.name} {rd.ALGORITHM.version}"}
    assert service.stats(model="no-such-model") == []
    db.dispose()


def test_only_an_existing_enabled_account_signs(tmp_path: Path, sqlite_url: str) -> None:
    from daemon.accounts import AccountService
    from daemon.config import WebConfig

    config = make_config(tmp_path, sqlite_url)
    db = Database(config.database_url, audit_key=KEY)
    service = ReviewService(db, config)
    accounts = AccountService(db, WebConfig())
    accounts.add("smith", "correct horse battery", "reviewer", "test", full_name="Smith^Jane")
    # The account's full name signs, never the text typed after --reviewer.
    assert service.account_reviewer("smith") == Reviewer("Smith^Jane", config.review.organization)
    with pytest.raises(ReviewError, match="no account 'Mickey Mouse'"):
        service.account_reviewer("Mickey Mouse")
    accounts.disable("smith", "test")
    with pytest.raises(ReviewError, match="disabled"):
        service.account_reviewer("smith")
    db.dispose()


def test_one_result_that_cannot_be_finalized_holds_back_no_other(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path, sqlite_url, PACS)
    db = Database(config.database_url, audit_key=KEY)
    _, broken_uid = reported_result(db, config, tmp_path / "a")
    reported_result(db, config, tmp_path / "b")
    service = ReviewService(db, config)
    first, second = service.results()
    for result in (first, second):  # signed on the web page: held for the undo window
        assert service.decide(result.run_id, "confirm", service.reviewer("Smith^Jane"),
                              hold=True) is None  # fmt: skip
    assert service.finalize_pending() == 0  # still inside the window
    due = service.next_release()
    assert due is not None
    broken = first if first.study_instance_uid == broken_uid else second
    sr = verified_file(config, broken.study_instance_uid, broken.ai_sr_sop_instance_uid or "")
    sr.unlink()  # its AI SR gone from the outbox: this one cannot be built
    caplog.set_level(logging.ERROR)
    assert service.finalize_pending(due + timedelta(seconds=1)) == 1  # the other one is
    assert f"result {broken.run_id}: verified SR not built" in caplog.text
    assert [r.state for r in service.results(state="decided")] == ["verified"]
    db.dispose()
