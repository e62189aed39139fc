"""The review web page in a real browser: a radiologist confirms an AI finding.

A real daemon (web page enabled) analyses a demo CT sent by storescu and
delivers its AI SR to Orthanc; in headless Chromium the reviewer logs in,
finds the result at the top of the worklist, opens it, confirms the finding,
and the verified SR arrives in Orthanc; then logs out. No URL the browser
asks for, and no log line, holds the patient's name or ID.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage

from dicom_io.sr import read_findings
from tests.conftest import REPO, free_port, storescu
from tests.orthanc import Orthanc
from tests.test_orthanc import by_class, fetch
from tests.test_review_orthanc import delivery, demo_ct
from tests.test_viewer import _save
from tests.viewer import browser

PASSWORD = "correct horse battery"


def test_reviewer_confirms_in_the_browser_and_the_pacs_gets_the_verified_sr(
    daemon_factory, orthanc_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    orthanc: Orthanc = orthanc_factory().start()
    web_port = free_port()
    d = daemon_factory(delivery(orthanc) + f"\n[web]\nenabled = true\nport = {web_port}\n")
    d.cli("db", "upgrade")
    added = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "user", "add", "smith",
         "--full-name", "Smith^Jane", "--password-stdin"],
        cwd=REPO, env=d.env, input=PASSWORD + "\n", capture_output=True, text=True,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    admin = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "user", "add", "root", "--role", "admin",
         "--password-stdin"],
        cwd=REPO, env=d.env, input=PASSWORD + "\n", capture_output=True, text=True,
    )  # fmt: skip
    assert admin.returncode == 0, admin.stderr
    d.start()
    files = demo_ct(tmp_path / "ct", seed=3)
    header = dcmread(files[0], stop_before_pixels=True)
    study_uid = str(header.StudyInstanceUID)
    other = demo_ct(tmp_path / "ct2", seed=5)
    other_uid = str(dcmread(other[0], stop_before_pixels=True).StudyInstanceUID)
    for sent in (files, other):
        assert storescu(d.port, sent).returncode == 0
    for uid in (study_uid, other_uid):
        d.wait_for(lambda u=uid: by_class(orthanc.study_instances(u), Comprehensive3DSRStorage),
                   timeout=300)  # fmt: skip

    site = f"http://127.0.0.1:{web_port}"
    with browser() as page:
        urls: list[str] = []
        page.on("request", lambda r: urls.append(r.url))
        page.goto(f"{site}/")
        assert page.url.endswith("/login")
        page.fill("input[name=username]", "smith")
        page.fill("input[name=password]", PASSWORD)
        page.click("#login")
        page.wait_for_selector("#worklist")
        _save(page, tmp_path, "web-worklist.png")
        rows = page.locator("#worklist tbody tr")
        assert rows.count() == 2 and "Nodule present" in rows.first.inner_text()
        first_run = rows.first.locator("a").inner_text()
        rows.first.locator("a").click()
        page.wait_for_selector("#finding-1")
        assert str(header.PatientName) in page.inner_text("#patient")
        page.fill("#finding-1 input[name=comment]", "solid nodule")
        page.click("#finding-1 button.confirm")
        page.wait_for_selector(".done")
        _save(page, tmp_path, "web-result.png")
        assert "confirm by Smith^Jane" in page.inner_text("main")
        srs = d.wait_for(
            lambda: (found := by_class(orthanc.study_instances(study_uid),
                                       Comprehensive3DSRStorage)) and len(found) == 2 and found,
            timeout=120,
        )  # fmt: skip
        assert {s["SeriesDescription"] for s in srs} >= {"AI RESULT - PHYSICIAN REVIEWED"}
        # The other result: the reviewer clicks the true location on the image.
        page.goto(f"{site}/")
        second = page.locator("#worklist tbody tr a")
        assert second.count() == 1 and second.first.inner_text() != first_run
        second.first.click()
        page.wait_for_selector("#key-image")
        page.click("#overlay")  # the saliency map on, then the click
        page.wait_for_selector("#key-image")
        _save(page, tmp_path, "web-result-overlay.png")
        page.click("#key-image", position={"x": 100, "y": 120})
        page.wait_for_selector(".done")
        assert "correct by Smith^Jane" in page.inner_text("main")
        corrected = d.wait_for(
            lambda: (found := [i for i in by_class(orthanc.study_instances(other_uid),
                                                    Comprehensive3DSRStorage)
                               if i["SeriesDescription"] == "AI RESULT - PHYSICIAN REVIEWED"])
            and found,
            timeout=120,
        )  # fmt: skip
        sr, _path = fetch(orthanc, corrected[0], tmp_path / "from-orthanc")
        (finding,) = read_findings(sr)
        assert finding["present"] is True and finding["graphic_data"] == [(100.0, 120.0)]
        page.click("#logout")
        page.wait_for_selector("#login")
        page.goto(f"{site}/")
        assert page.url.endswith("/login")  # logged out: back to the login
        # The administrator's monitoring page: one confirmed, one corrected.
        page.fill("input[name=username]", "root")
        page.fill("input[name=password]", PASSWORD)
        page.click("#login")
        page.wait_for_selector("#worklist")
        page.goto(f"{site}/admin/monitoring")
        overall = page.locator("#agreement tr", has_text="overall").inner_text().split()
        # model name, version, "overall", then confirmed, rejected, corrected
        assert overall[3:6] == ["1", "0", "1"], overall
        page.wait_for_function("document.getElementById('plot').naturalWidth > 0")
        _save(page, tmp_path, "web-monitoring.png")
        # Operations: the worker that analysed both studies, and on which device.
        page.goto(f"{site}/admin")
        workers = page.inner_text("#workers")
        assert "worker" in workers and ("cpu" in workers or "cuda" in workers), workers
        assert workers.strip().endswith("2")  # two analyses
    for url in urls:
        assert str(header.PatientName) not in url and str(header.PatientID) not in url
    log = d.log()
    assert str(header.PatientName) not in log and str(header.PatientID) not in log
    assert d.stop() == 0
