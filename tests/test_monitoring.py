"""Sensitivity from sampled AI negatives, subgroups, champion and challenger, report and export.

A stream of studies with known truth: chest radiographs from the phantom
generator, half with a nodule, scored by the built-in CR model at its
threshold; the nodules are faint, so that it misses some. Each score is recorded
as the worker records a result, the real report stage decides which AI
negatives are drawn for review (`negative_sample_fraction = 0.5`), and a
"reader" who knows the truth decides every result in the worklist through
the review service. The estimated sensitivity's interval must contain the
true sensitivity of the stream, which only the generator knows.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from daemon.config import Config
from daemon.stages.monitor.governance import GovernanceService
from daemon.stages.monitor.performance import Interval, wilson
from daemon.stages.monitor.report import export_csv, export_json, pdf, report_lines
from daemon.stages.report import Reporter
from daemon.stages.review import ReviewService
from daemon.web import create_app
from db import migrate
from db.models import AnalysisRun, AuditEvent, ReviewSelection
from db.monitoring import registry_rows
from db.reviews import list_results
from db.session import Database
from model.datasets import sample_seed, synthetic_cr_sample
from model.registry import builtin_model_dir, load_model
from tests import reportdata as rd
from tests.configs import write_config
from tests.conftest import create_pg_database
from tests.dicomgen import PATIENT_ID, PATIENT_NAME
from tests.test_web import PASSWORD, login

N_STUDIES = 80
SEED = 20261205
CHALLENGER = "2.0.0"


def _scores() -> tuple[np.ndarray, np.ndarray, float]:
    """Truth, the CR model's probability for N_STUDIES phantom radiographs, and its threshold.

    The nodules are faint: the phantom's nodule blended in at 10-60 % of its
    contrast (same anatomy with and without it), as the small and
    ground-glass nodules the models miss. So the stream has misses to find.
    """
    model = load_model(builtin_model_dir("cr-nodule"), "cpu")
    spec = model.manifest.input
    truth = np.arange(N_STUDIES) % 2 == 0
    rng = np.random.default_rng(SEED)
    images = []
    for i, there in enumerate(truth):
        clear = synthetic_cr_sample(sample_seed(SEED, "test", i), False, spec)[0]
        if there:
            nodule = synthetic_cr_sample(sample_seed(SEED, "test", i), True, spec)[0] - clear
            clear = clear + rng.uniform(0.1, 0.6) * nodule
        images.append(clear)
    probabilities = model.predict(np.stack(images), batch_size=32,
                                  with_saliency=False).probabilities[:, 0]  # fmt: skip
    return truth, np.asarray(probabilities, dtype=np.float64), float(model.manifest.threshold)


@dataclasses.dataclass
class Stream:
    config: Config
    db: Database
    truth: dict[int, bool]  # run id -> a nodule is there
    present: dict[int, bool]  # run id -> the AI called it
    threshold: float
    tmp: Path


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stream(request: pytest.FixtureRequest, tmp_path_factory) -> Stream:
    """The stream on each backend: the governance queries are SQL of their own."""
    tmp = tmp_path_factory.mktemp("monitoring")
    url = f"sqlite:///{tmp / 'db.sqlite'}"
    if request.param == "postgresql":
        url = create_pg_database(request.getfixturevalue("pg_server"), f"monitoring_{os.getpid()}")
    config = write_config(tmp, url, """
[monitoring]
negative_sample_fraction = 0.5
min_group_size = 10

[web]
enabled = true

[report]
segmentation = false

[[delivery.destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 11112
outputs = ["sr"]
""")  # fmt: skip
    migrate.upgrade(config.database_url)
    db = Database(config.database_url, audit_key=bytes(range(32)))
    truth, scores, threshold = _scores()
    rng = np.random.default_rng(SEED)
    by_run: dict[int, bool] = {}
    called: dict[int, bool] = {}
    for i in range(N_STUDIES):
        files = rd.ct_study(tmp / f"s{i}", slices=3, size=16, seed=1000 + i)
        study_uid = rd.receive(db, config.storage.spool_dir, files,
                               calling_ae="CT_EAST" if i % 4 else "CT_WEST")  # fmt: skip
        observation = {
            "modality": "CR", "manufacturer": "Rare Imaging" if i < 6 else "Acme",
            "patient_sex": "F" if i % 3 else "M", "age_band": ["40-59", "60-79"][i % 2],
            "noise": float(rng.normal(10, 1)), "p50": 0.0,
        }  # fmt: skip
        champion = _result(files, float(scores[i]), threshold, observation)
        # The challenger: the same network at a lower threshold.
        challenger = _result(files, float(scores[i]), threshold / 8, observation, CHALLENGER)
        rd.record_analysis(db, config.storage.state_dir, study_uid, [champion, challenger])
        with db.session() as s:
            run_id = s.scalar(select(AnalysisRun.id).where(AnalysisRun.model_version == "1.0.0")
                              .order_by(AnalysisRun.id.desc()))  # fmt: skip
        by_run[run_id] = bool(truth[i])
        called[run_id] = scores[i] >= threshold
    reporter, reported = Reporter(db, config), 0
    while done := reporter.run_once():  # 20 runs a pass
        reported += done
    assert reported == 2 * N_STUDIES
    # The reader knows the truth, and decides every result the worklist shows them.
    service = ReviewService(db, config)
    reader = service.reviewer("Smith^Jane")
    with db.session() as s:
        listed = list_results(s, state="pending", model=rd.ALGORITHM.name, limit=10_000)
    for result in listed:
        if result.model_version != "1.0.0":
            continue
        ai, there = result.findings[0].present, by_run[result.run_id]
        service.decide(result.run_id, "confirm" if ai == there else "reject", reader)
    return Stream(config, db, by_run, called, threshold, tmp)


def _result(files, probability, threshold, observation, version="1.0.0"):
    base = rd.analysed(files, probability=probability)
    finding = dataclasses.replace(base.findings[0], threshold=threshold)
    algorithm = dataclasses.replace(rd.ALGORITHM, version=version)
    return dataclasses.replace(base, findings=[finding], algorithm=algorithm,
                               observation=observation)  # fmt: skip


def test_sensitivity_from_sampled_negatives_covers_the_truth(stream: Stream) -> None:
    runs = stream.truth
    positives = [r for r in runs if stream.truth[r]]
    true_sensitivity = sum(stream.present[r] for r in positives) / len(positives)
    negatives = [r for r in runs if not stream.present[r]]
    true_npv = sum(not stream.truth[r] for r in negatives) / len(negatives)
    assert 0.3 < true_sensitivity < 0.9, "the stream must have misses to find"

    with stream.db.session() as s:
        selection = dict(s.execute(select(AnalysisRun.id, AnalysisRun.review_selection)
                                   .where(AnalysisRun.id.in_(list(runs)))).all())  # fmt: skip
    drawn = [r for r in negatives if selection[r] == ReviewSelection.SAMPLED_NEGATIVE]
    assert all(selection[r] == ReviewSelection.POSITIVE for r in runs if stream.present[r])
    # About half of the AI negatives drawn, and only those listed for the reader.
    assert 0.3 * len(negatives) <= len(drawn) <= 0.7 * len(negatives)
    with stream.db.session() as s:
        listed = {r.run_id for r in list_results(s, state=None, limit=10_000)}
    assert not ({r for r in negatives if r not in drawn} & listed)

    p = GovernanceService(stream.db, stream.config).evidence(rd.ALGORITHM.name, "1.0.0").performance
    assert p.negative_decided == len(drawn) and p.negative_drawn == len(drawn)
    assert p.n_negative == len(negatives)
    sens, npv = p.sensitivity, p.npv
    assert sens.low is not None and sens.high is not None
    assert sens.low <= true_sensitivity <= sens.high, (sens, true_sensitivity)
    assert npv.low is not None and npv.high is not None
    assert npv.low <= true_npv <= npv.high, (npv, true_npv)
    # PPV is exact here (every positive decided, the reader knows the truth).
    tp = sum(stream.truth[r] for r in runs if stream.present[r])
    assert p.ppv.estimate == pytest.approx(tp / sum(stream.present.values()))


def test_wilson_interval_matches_a_hand_computed_case() -> None:
    # 19 of 20: the example, 0.76-0.99.
    i: Interval = wilson(19, 20)
    assert (round(i.low or 0, 2), round(i.high or 0, 2)) == (0.76, 0.99)
    assert wilson(0, 0).estimate is None


def test_champion_and_challenger_side_by_side(stream: Stream) -> None:
    ev = GovernanceService(stream.db, stream.config).evidence(rd.ALGORITHM.name, "1.0.0")
    c = ev.side_by_side[CHALLENGER]
    assert c.n == N_STUDIES
    # The challenger's lower threshold calls everything the champion calls, and more.
    assert c.only_first == 0 and c.only_second > 0
    assert c.both_present == sum(stream.present.values())
    with stream.db.session() as s:
        versions = set(s.scalars(select(AnalysisRun.model_version).where(
            AnalysisRun.sr_sop_instance_uid.is_not(None))))  # fmt: skip
    assert versions == {"1.0.0", CHALLENGER}  # each its own SR, neither superseding the other


def test_subgroups_on_the_page_with_intervals_and_small_groups_marked(stream: Stream) -> None:
    from daemon.accounts import AccountService

    AccountService(stream.db, stream.config.web).add(
        "root", PASSWORD, "admin", "test")
    app = create_app(stream.config, stream.db)
    client = app.test_client()
    assert login(client, "root").status_code == 302
    page = client.get(f"/admin/monitoring/{rd.ALGORITHM.name}/1.0.0").get_data(as_text=True)
    rows = re.findall(r'<tr class="(too-few|)"><td>([^<]+)</td><td class="group">([^<]+)</td>'
                      r"<td>(\d+)</td>", page)  # fmt: skip
    groups = {(var, group): (mark, int(n)) for mark, var, group, n in rows}
    assert {"sex", "age band", "manufacturer", "sending AE title"} == {v for v, _ in groups}
    assert groups[("manufacturer", "Rare Imaging")][0] == "too-few"
    assert groups[("manufacturer", "Acme")] [0] == ""
    assert groups[("sending AE title", "CT_EAST")][1] > groups[("sending AE title", "CT_WEST")][1]
    assert "too few to say" in page
    # Every group's PPV and sensitivity carry an interval: "62 % (45–77 %)".
    assert len(re.findall(r"\d+ % <span class=\"hint\">\(\d+–\d+ %\)", page)) >= 2 * len(groups)
    pdf_rsp = client.get(f"/admin/monitoring/{rd.ALGORITHM.name}/1.0.0/report.pdf")
    assert pdf_rsp.status_code == 200 and pdf_rsp.data.startswith(b"%PDF")
    assert len(re.findall(rb"/Type\s*/Page\b(?!s)", pdf_rsp.data)) >= 2  # figures, subgroups


def test_export_holds_no_patient_identity(stream: Stream) -> None:
    with stream.db.session() as s:
        rows = registry_rows(s)
        study_uids = set(s.scalars(select(AnalysisRun.study_id)))
    assert len(rows) == 2 * N_STUDIES
    text_csv, text_json = export_csv(rows), export_json(rows)
    parsed = list(csv.DictReader(io.StringIO(text_csv)))
    assert {r["model_version"] for r in parsed} == {"1.0.0", CHALLENGER}
    assert {r["patient_sex"] for r in parsed} == {"F", "M"}
    assert json.loads(text_json)["records"][0]["analysed_week"].count("-W") == 1
    # The demo patients' values, their UIDs and dates appear nowhere.
    from pydicom import dcmread

    header = dcmread(next((stream.tmp / "s0").glob("*.dcm")), stop_before_pixels=True)
    secrets = {PATIENT_NAME, PATIENT_ID, str(header.PatientName), str(header.PatientID),
               str(header.StudyInstanceUID), str(header.SeriesInstanceUID)}  # fmt: skip
    for field in ("PatientBirthDate", "StudyDate", "AccessionNumber"):
        if str(header.get(field, "")).strip():
            secrets.add(str(header.get(field)))
    for text in (text_csv, text_json):
        assert not [v for v in secrets if v and v in text], "identity in the export"
    assert study_uids  # rows exist to leak from


def test_report_text_names_mode_period_and_figures(stream: Stream) -> None:
    report = GovernanceService(stream.db, stream.config).report(rd.ALGORITHM.name, "1.0.0")
    text = "\n".join(report_lines(report))
    assert "mode live (the site's default)" in text
    assert "Sensitivity" in text and "Side by side with 2.0.0" in text
    # All of the stream fell on one day: the drift baseline is still forming.
    assert "Drift: baseline" in text and "still forming" in text
    assert pdf(report).startswith(b"%PDF")


def test_web_export_is_audited(stream: Stream) -> None:
    app = create_app(stream.config, stream.db)
    client = app.test_client()
    from daemon.accounts import AccountService

    AccountService(stream.db, stream.config.web).add(
        "auditor", PASSWORD, "admin", "test")
    assert login(client, "auditor").status_code == 302
    rsp = client.get("/admin/monitoring/export.csv")
    assert rsp.status_code == 200 and rsp.data.startswith(b"analysed_week,")
    with stream.db.session() as s:
        events = list(s.scalars(select(AuditEvent).where(
            AuditEvent.event_type == "monitoring.exported")))  # fmt: skip
    assert any(e.actor == "auditor" and e.detail["rows"] == 2 * N_STUDIES for e in events)


def test_promotion_on_the_web_page_needs_a_reason_and_is_audited(stream: Stream) -> None:
    from daemon.accounts import AccountService
    from daemon.metrics import DatabaseCollector
    from tests.test_web import csrf

    AccountService(stream.db, stream.config.web).add(
        "chair", PASSWORD, "admin", "test")
    reader = AccountService(stream.db, stream.config.web)
    reader.add("reader", PASSWORD, "reviewer", "test")
    page = f"/admin/monitoring/{rd.ALGORITHM.name}/{CHALLENGER}"
    client = create_app(stream.config, stream.db).test_client()
    assert login(client, "reader").status_code == 302
    assert client.get(page).status_code == 403  # admins only
    client = create_app(stream.config, stream.db).test_client()
    assert login(client, "chair").status_code == 302
    token = csrf(client, page)
    shown = client.get(page).get_data(as_text=True)
    assert "Side by side with version 1.0.0" in shown and "Sensitivity" in shown
    assert f'href="{page}/drift"' in shown  # the version's drift page, one click away
    refused = client.post(f"{page}/mode", data={"csrf": token, "mode": "silent", "reason": " "})
    assert refused.status_code == 400 and "reason" in refused.get_data(as_text=True)
    reason = "challenger: back to a silent trial"
    done = client.post(f"{page}/mode", data={"csrf": token, "mode": "silent", "reason": reason})
    assert done.status_code == 302
    shown = client.get(page).get_data(as_text=True)
    assert '<strong id="mode">silent</strong>' in shown
    assert reason in shown
    with stream.db.session() as s:
        event = s.scalars(select(AuditEvent).where(
            AuditEvent.event_type == "model.mode_changed")).all()[-1]  # fmt: skip
    assert event.actor == "chair" and event.detail["model"] == f"{rd.ALGORITHM.name} {CHALLENGER}"
    assert event.detail["evidence"]["runs"] == N_STUDIES
    samples = {
        tuple(sample.labels.values()): sample.value
        for family in DatabaseCollector(stream.db, config=stream.config).collect()
        if family.name == "secondreader_model_mode"
        for sample in family.samples
    }
    assert samples == {(rd.ALGORITHM.name, "1.0.0", "live"): 1,
                       (rd.ALGORITHM.name, CHALLENGER, "silent"): 1}  # fmt: skip


def test_unsampled_negatives_never_reach_an_after_review_destination(tmp_path: Path) -> None:
    """A negative left out of the sample is never read, so `after_review` never gets it;
    one drawn waits for its reader; retention does not wait for either forever."""
    from db.models import OutboxItem
    from db.retention import finished_studies

    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", """
[monitoring]
negative_sample_fraction = 0.5

[report]
segmentation = false

[[delivery.destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 11112
release = "after_review"
outputs = ["sr", "summary"]
""")  # fmt: skip
    migrate.upgrade(config.database_url)
    db = Database(config.database_url, audit_key=bytes(range(32)))
    for i in range(8):
        files = rd.ct_study(tmp_path / f"s{i}", slices=3, size=16, seed=2000 + i)
        study_uid = rd.receive(db, config.storage.spool_dir, files)
        rd.record_analysis(db, config.storage.state_dir, study_uid,
                           [rd.analysed(files, probability=0.1)])  # fmt: skip
    reporter = Reporter(db, config)
    while reporter.run_once():
        pass
    with db.session() as s:
        rows = s.execute(select(AnalysisRun.review_selection, OutboxItem.object_kind,
                                OutboxItem.state).join(OutboxItem, OutboxItem.run_id ==
                                AnalysisRun.id)).all()  # fmt: skip
        finished = {f.study_instance_uid for f in finished_studies(s, wait_for_review=True)}
        chosen = select(AnalysisRun.study_id, AnalysisRun.review_selection)
        selections = dict(s.execute(chosen).all())
    states = {(sel, kind, state) for sel, kind, state in rows}
    assert {sel for sel, _, _ in states} == {"sampled_negative", "unsampled_negative"}
    assert {(kind, state) for sel, kind, state in states if sel == "unsampled_negative"} == {
        ("sr", "withheld"), ("summary", "withheld")}
    assert {(kind, state) for sel, kind, state in states if sel == "sampled_negative"} == {
        ("sr", "held"), ("summary", "held")}
    # Held objects keep a study's files; withheld ones and unread results do not.
    assert len(finished) == list(selections.values()).count("unsampled_negative") > 0


def test_a_configured_version_gets_its_mode_before_its_first_study(tmp_path: Path) -> None:
    """A new version is set silent before it has seen a study; an unknown one is refused."""
    from daemon.stages.monitor.governance import GovernanceError

    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate.upgrade(config.database_url)
    db = Database(config.database_url, audit_key=bytes(range(32)))
    from daemon.accounts import AccountService

    AccountService(db, config.web).add("chair", PASSWORD, "admin", "test")
    service = GovernanceService(db, config)
    listed = {(v.model_name, v.model_version): (v.mode, v.runs) for v in service.versions()}
    assert listed == {("secondreader-demo-nodule-cr", "1.1.0"): ("live", 0),
                      ("secondreader-demo-nodule-ct", "1.1.0"): ("live", 0)}  # fmt: skip
    why = "new version: silent trial"
    change = service.set_mode("secondreader-demo-nodule-ct", "1.1.0", "silent",
                              by=service.admin("chair"), reason=why)  # fmt: skip
    assert change.mode == "silent" and change.evidence["runs"] == 0
    with pytest.raises(GovernanceError, match="not configured"):
        service.set_mode("secondreader-demo-nodule-ct", "9.9", "live", by="chair", reason="x")
    with pytest.raises(GovernanceError, match="already silent"):
        service.set_mode("secondreader-demo-nodule-ct", "1.1.0", "silent", by="chair", reason="x")
    db.dispose()


def test_versions_are_compared_per_study_not_by_their_lesion_numbers(tmp_path: Path) -> None:
    """A detector's or a segmentation's lesions are numbered by each version's own
    ranking: "lesion 1" of one need not be "lesion 1" of the other. The committee's
    side-by-side compares the study's call per label: any lesion present."""
    from db.governance import PairedCall, paired_calls

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate.upgrade(url)
    db = Database(url, audit_key=bytes(range(32)))

    def version(files: list[Path], version: str, lesions: list[bool]):  # type: ignore[no-untyped-def]
        base = rd.analysed(files)
        findings = [dataclasses.replace(base.findings[0], lesion=i + 1 if present else None,
                                        probability=0.9 if present else 0.1, threshold=0.5)
                    for i, present in enumerate(lesions)]  # fmt: skip
        return dataclasses.replace(base, findings=findings, algorithm=dataclasses.replace(
            rd.ALGORITHM, version=version))

    # Study 1: two lesions by the champion, one by the challenger; study 2: none, one.
    for i, (champion, challenger) in enumerate((([True, True], [True]), ([False], [True]))):
        files = rd.ct_study(tmp_path / f"s{i}", slices=3, size=16, seed=50 + i)
        study_uid = rd.receive(db, tmp_path / "spool", files)
        rd.record_analysis(db, tmp_path / "state", study_uid,
                           [version(files, "1.0.0", champion), version(files, "2.0.0", challenger)])
    with db.session() as s:
        pairs = paired_calls(s, rd.ALGORITHM.name, "1.0.0", "2.0.0")
    label = rd.analysed(files).findings[0].label
    assert pairs == [PairedCall(label, True, True), PairedCall(label, False, True)]
