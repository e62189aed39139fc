"""Pull mode against a real PACS: C-FIND on Orthanc, C-MOVE into our daemon."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import storescu
from tests.dicomgen import RECEIVE_ONLY, DaemonDB, ct_study, header
from tests.orthanc import orthanc_factory  # noqa: F401  (fixture)


def test_find_and_pull_a_study_from_orthanc(
    daemon_factory, orthanc_factory, tmp_path: Path  # noqa: F811
) -> None:
    daemon = daemon_factory(RECEIVE_ONLY)
    orthanc = orthanc_factory()
    # Orthanc must know where our AE lives to C-MOVE to it.
    orthanc.config["DicomModalities"] = {
        "secondreader": {"AET": "SECONDREADER", "Host": "127.0.0.1", "Port": daemon.port}
    }
    orthanc.start()
    daemon.start()
    files = ct_study(tmp_path / "ct", 8, seed=31)
    study_uid = header(files[0]).study_instance_uid
    # The PACS holds the study (sent by dcmtk, as a modality would).
    sent = storescu(orthanc.dicom_port, files, aec=orthanc.aet)
    assert sent.returncode == 0, sent.stderr

    remote = ["--host", "127.0.0.1", "--port", str(orthanc.dicom_port), "--aet", orthanc.aet]
    found = daemon.cli("find", *remote, "--modality", "CT")
    assert study_uid in found.stdout and "8 instance(s)" in found.stdout
    # No patient attribute is printed: administrators paste this output around.
    assert "Phantom" not in found.stdout and "SR-TEST-0001" not in found.stdout

    pulled = daemon.cli("pull", *remote, study_uid)
    assert "8 sent to SECONDREADER, 0 failed" in pulled.stdout

    db = DaemonDB.of(daemon.state)
    daemon.wait_for(lambda: db.complete(study_uid), timeout=30)
    assert {r.sop_instance_uid for r in db.instances(study_uid)} == {
        header(p).sop_instance_uid for p in files
    }
    # A study the PACS does not hold: the pull reports it and exits non-zero.
    missing = daemon.cli("pull", *remote, "1.2.3.4.5.6.7.8.9", check=False)
    assert missing.returncode == 1
    assert daemon.stop() == 0
    db.close()
