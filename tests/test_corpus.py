"""The whole real-image corpus, as a PACS administrator would send it.

Every DICOM file of pydicom's test files and of pydicom-data goes to a real
daemon (the built-in models, an in-process worker), each on its own
association, with dcmtk's dcmsend proposing the file's own transfer syntax.
Real images lack Type 2 attributes, carry malformed values, were
de-identified: the test holds the daemon to its promise that every study it
accepted ends with an SR, a result or a "not run" one, and that each SR
passes dciodvfy with no errors.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.filereader import read_file_meta_info

from db.models import AnalysisRun, ReportState, Study
from model.results import Outcome
from tests.conftest import dcmtk_env, require_tool
from tests.dicom_validate import dciodvfy_errors
from tests.dicomgen import DaemonDB, phi_in

CONFIG = """
[worker]
max_attempts = 2
retry_backoff_seconds = 0
poll_seconds = 0.5

[report]
check_interval_seconds = 0.5
"""


def corpus() -> list[Path]:
    """Every Part 10 file of the two packages, DICOMDIRs left out (not a storage object)."""
    files = []
    for name in sorted(get_testdata_files()):
        path = Path(name)
        try:
            meta = read_file_meta_info(path)
        except Exception:
            continue  # not Part 10: nothing a DICOM sender would send
        if str(meta.get("MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10":
            continue
        files.append(path)
    return files


def dcmsend(port: int, path: Path) -> subprocess.CompletedProcess[str]:
    # -dn: never decompress, propose the file's own syntax. One association per file.
    return subprocess.run(
        [require_tool("dcmsend"), "-aet", "CORPUS", "-aec", "SECONDREADER", "-dn"]
        + ["127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        env=dcmtk_env(),
    )


def _names_and_ids(files: list[Path]) -> set[str]:
    values: set[str] = set()
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID"])
        except Exception:
            continue
        for keyword in ("PatientName", "PatientID"):
            value = str(ds.get(keyword, "") or "").strip()
            # Values of 4+ characters, not all digits: short IDs match inside UIDs.
            if len(value.strip("^ ")) >= 4 and not value.replace(".", "").isdigit():
                values.add(value)
    return values


def test_every_accepted_study_gets_an_sr_that_passes_dciodvfy(daemon_factory) -> None:
    files = corpus()
    assert len(files) > 100
    d = daemon_factory(CONFIG).start()
    for path in files:
        dcmsend(d.port, path)  # some are refused (no UIDs, broken): that is their status
    db = DaemonDB.of(d.state)

    def settled() -> bool:
        with db.db.session() as s:
            studies = s.query(Study).all()
            runs = s.query(AnalysisRun).all()
        reported = {r.study_id for r in runs if r.report_state == ReportState.REPORTED}
        pending = [r for r in runs if r.report_state == ReportState.PENDING]
        return bool(studies) and not pending and {st.id for st in studies} <= reported

    d.wait_for(settled, timeout=600, interval=1.0)
    with db.db.session() as s:
        studies = s.query(Study).all()
        runs = s.query(AnalysisRun).all()
    db.close()
    assert len(studies) >= 15
    assert [r.report_error for r in runs if r.report_state == ReportState.FAILED] == []
    # Every built-in model was made on phantoms: on a real image it applies to
    # (modality, body part) its out-of-distribution gate says "not run", with
    # the reason, and no model makes a call, present or absent, on any of them.
    assert [(r.model_name, r.outcome) for r in runs if r.outcome == Outcome.ANALYSED] == []
    gated = [r for r in runs if r.outcome == Outcome.FAILED_QC and "made for" in (r.reason or "")]
    assert {r.model_name for r in gated} >= {"secondreader-demo-nodule-ct",
                                             "secondreader-demo-nodule-cr"}  # fmt: skip
    srs = sorted((d.state / "outbox").rglob("*.dcm"))
    by_study: dict[str, list[Path]] = {}
    for path in srs:
        ds = dcmread(path, stop_before_pixels=True)
        if ds.Modality == "SR":
            by_study.setdefault(str(ds.StudyInstanceUID), []).append(path)
    assert sorted(by_study) == sorted(st.study_instance_uid for st in studies)
    problems = {str(p.name): errs for p in srs if (errs := dciodvfy_errors(p))}
    assert problems == {}
    # The whole run logged no patient name or ID (a few files carry real-looking ones).
    assert phi_in(d.log(), _names_and_ids(files)) == []
    assert d.stop() == 0
