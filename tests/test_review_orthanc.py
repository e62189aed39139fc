"""Physician review end to end, with Orthanc as the PACS and the CLI as the reviewer.

A demo CT with a nodule goes in by storescu and is analysed by the built-in
model; the AI SR reaches Orthanc; `secondreader review confirm|reject|correct`
decides; the verified SR arrives in the same study in Orthanc, VERIFIED,
with the verifying observer and the AI SR as predecessor, and passes
dciodvfy. An amendment supersedes it; `after_review` holds everything back
until the decision.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage

from dicom_io.sr import read_findings
from dicom_io.synthetic import write_ct_series
from model.phantom import phantom_volume
from tests import reportdata as rd
from tests.conftest import DaemonProcess, storescu
from tests.dicom_validate import dciodvfy_errors
from tests.orthanc import Orthanc
from tests.test_orthanc import NO_WORKER, by_class, fetch, open_db, outbox


def delivery(orthanc: Orthanc, release: str = "immediate") -> str:
    return f"""
[report]
check_interval_seconds = 0.3

[review]
organization = "Test Hospital Radiology"

[delivery]
check_interval_seconds = 0.3
retry_base_seconds = 0.5
retry_max_seconds = 1

[[delivery.destinations]]
name = "orthanc"
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
release = "{release}"
"""


def demo_ct(folder: Path, seed: int) -> list[Path]:
    volume, _ = phantom_volume(seed, n_slices=40, rows=256, cols=256, lesion=True)
    return write_ct_series(volume, folder, spacing=(2.5, 1.4, 1.4), seed=seed)


def result_of(d: DaemonProcess, study_uid: str, state: str = "pending") -> dict:
    def found() -> dict | None:
        rows = json.loads(d.cli("review", "list", "--state", state, "--json").stdout)
        return next((r for r in rows if r["study_instance_uid"] == study_uid), None)

    return d.wait_for(found, timeout=300, interval=0.5)


def srs_in_orthanc(orthanc: Orthanc, study_uid: str, n: int, d: DaemonProcess) -> list[dict]:
    def found() -> list[dict] | None:
        hits = by_class(orthanc.study_instances(study_uid), Comprehensive3DSRStorage)
        return hits if len(hits) >= n else None

    return d.wait_for(found, timeout=120, interval=0.5)


def verified_from_orthanc(orthanc: Orthanc, study_uid: str, uid: str, folder: Path):
    (entry,) = [
        i
        for i in by_class(orthanc.study_instances(study_uid), Comprehensive3DSRStorage)
        if i["SOPInstanceUID"] == uid
    ]
    return fetch(orthanc, entry, folder)


def predecessor(sr) -> str:
    ref = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    return str(ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def test_confirm_reject_correct_and_amend_through_orthanc(
    tmp_path: Path, daemon_factory, orthanc_factory
) -> None:
    orthanc = orthanc_factory().start()
    d = daemon_factory(delivery(orthanc)).start()
    d.add_user("smith", "Smith^Jane")
    d.add_user("doe", "Doe^John")
    studies = {}
    for name, seed in (("confirm", 3), ("reject", 4), ("correct", 5)):
        files = demo_ct(tmp_path / name, seed)
        r = storescu(d.port, files)
        assert r.returncode == 0, r.stderr
        studies[name] = (files, str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID))

    verified = {}
    for name, (files, study_uid) in studies.items():
        result = result_of(d, study_uid)
        srs_in_orthanc(orthanc, study_uid, 1, d)  # the AI SR is there first (immediate)
        run = str(result["run_id"])
        if name == "correct":
            target = str(dcmread(files[5], stop_before_pixels=True).SOPInstanceUID)
            args = ["correct", run, "--finding", "1", "--slice", target]
            args += ["--box", "40", "50", "60", "70"]
        else:
            args = [name, run]
        out = d.cli("review", *args, "--reviewer", "smith", "--comment", f"{name}ed on CT")
        assert "verified SR" in out.stdout, out.stdout + out.stderr
        uid = out.stdout.split("verified SR ")[1].split()[0]
        verified[name] = uid
        srs_in_orthanc(orthanc, study_uid, 2, d)
        sr, path = verified_from_orthanc(orthanc, study_uid, uid, tmp_path / "from-orthanc")
        assert dciodvfy_errors(path) == [], path
        assert sr.StudyInstanceUID == study_uid
        assert (sr.VerificationFlag, sr.PreliminaryFlag) == ("VERIFIED", "FINAL")
        assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == "Smith^Jane"
        assert sr.VerifyingObserverSequence[0].VerifyingOrganization == "Test Hospital Radiology"
        assert predecessor(sr) == result["ai_sr"]
        (finding,) = read_findings(sr)
        if name == "confirm":
            assert finding["present"] is True and finding["graphic_data"]
        elif name == "reject":
            # Stated absent, framed whole: no spot on the key image (256 x 256).
            assert finding["present"] is False
            assert finding["graphic_data"] == [(0, 0), (256, 0), (256, 256), (0, 256), (0, 0)]
        else:
            assert finding["present"] is True
            assert finding["referenced_sop_instance_uid"] == target
            assert finding["graphic_data"] == [(40, 50), (60, 50), (60, 70), (40, 70), (40, 50)]

    # An amendment: a new verified SR in Orthanc, linked to the one it supersedes.
    files, study_uid = studies["confirm"]
    run = str(result_of(d, study_uid, "verified")["run_id"])
    refused = d.cli("review", "reject", run, "--reviewer", "doe", check=False)
    assert refused.returncode == 1 and "amendment" in refused.stderr
    out = d.cli(
        "review", "amend", run, "--finding", "1", "--decision", "reject",
        "--reason", "vessel seen end-on", "--reviewer", "doe",
    )  # fmt: skip
    amended = out.stdout.split("verified SR ")[1].split()[0]
    srs_in_orthanc(orthanc, study_uid, 3, d)
    sr, path = verified_from_orthanc(orthanc, study_uid, amended, tmp_path / "amended")
    assert predecessor(sr) == verified["confirm"]
    assert read_findings(sr)[0]["present"] is False
    assert dciodvfy_errors(path) == []
    shown = json.loads(d.cli("review", "show", run, "--json").stdout)
    assert [v["reason"] for v in shown["verifications"]] == [None, "vessel seen end-on"]
    events = [e["event"] for e in shown["history"]]
    assert "review.decided" in events and "review.amended" in events

    # The study's story, from the first association to the verified SRs.
    exported = d.cli("audit", "export", "--study", study_uid).stdout
    story = [json.loads(line) for line in exported.splitlines()]
    kinds = [e["event_type"] for e in story]
    assert kinds[0] == "association.accepted"
    assert kinds.count("review.verified_sr_created") == 2
    assert kinds.index("instance.stored") < kinds.index("analysis.recorded") < kinds.index(
        "review.decided"
    )
    stats = json.loads(d.cli("review", "stats", "--json").stdout)
    overall = next(r for r in stats if r["period"] == "overall")
    assert (overall["confirmed"], overall["rejected"], overall["corrected"]) == (0, 2, 1)
    assert d.stop() == 0
    assert d.cli("audit", "verify").returncode == 0


def test_after_review_the_pacs_gets_only_the_verified_result(
    tmp_path: Path, daemon_factory, orthanc_factory
) -> None:
    orthanc = orthanc_factory().start()
    d = daemon_factory(delivery(orthanc, "after_review"), env=NO_WORKER).start()
    d.add_user("smith", "Smith^Jane")
    files = rd.ct_study(tmp_path / "ct")
    assert storescu(d.port, files).returncode == 0
    db = open_db(d)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    rd.record_analysis(db, d.state, study_uid, [rd.analysed(files)])
    d.wait_for(lambda: {i.state for i in outbox(db)} == {"held"}, timeout=60)
    # Held: a few delivery ticks and the PACS still has nothing of ours.
    assert orthanc.find_study(study_uid) is None

    run = str(result_of(d, study_uid)["run_id"])
    shown = d.cli("review", "show", run).stdout
    # The received instances in one history line, not one per slice.
    assert shown.count("instance.stored") == 0 and shown.count("instance(s) received") == 1
    out = d.cli("review", "confirm", run, "--reviewer", "smith")
    uid = out.stdout.split("verified SR ")[1].split()[0]
    (entry,) = srs_in_orthanc(orthanc, study_uid, 1, d)
    d.wait_for(lambda: {i.state for i in outbox(db)} == {"withheld", "done"}, timeout=60)
    instances = orthanc.study_instances(study_uid)
    assert [i["SOPInstanceUID"] for i in instances] == [uid]  # no AI SR, no SEG
    assert entry["SOPInstanceUID"] == uid
    db.dispose()
    assert d.stop() == 0
