"""The review web page in a real browser, as a radiologist uses it.

A real daemon (web page enabled, a 20 s undo window) analyses three demo CTs
sent by storescu (two of 40 slices with a nodule, one of 300) and delivers
their AI SRs to Orthanc. In headless Chromium the reviewer:

* finds each study on the worklist by patient and accession number;
* presses Enter in every text field, on a choice and on the image: nothing
  is recorded and nothing reaches Orthanc;
* signs a rejection, undoes it inside the window (it never reaches
  Orthanc), then signs a confirmation, whose verified SR arrives after the
  window; amends it on the page with a reason (a superseding SR naming its
  predecessor);
* corrects a location with a marker placed by a click and moved by a drag,
  nothing signed until Sign;
* reads the 300-slice CT with the wheel and the keys (the slice-change time
  is printed), and the lung preset shows the lung that the soft-tissue
  window leaves black.

No URL the browser asks for, and no log line, holds a patient's name or ID.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage

from dicom_io.sr import read_findings
from dicom_io.synthetic import write_ct_series
from model.phantom import phantom_volume
from tests.conftest import USER_PASSWORD, DaemonProcess, free_port, storescu
from tests.orthanc import Orthanc
from tests.test_orthanc import by_class, fetch
from tests.test_review_orthanc import delivery, demo_ct, predecessor
from tests.test_viewer import _save
from tests.viewer import browser

UNDO_SECONDS = 20
REVIEWED = "AI RESULT - PHYSICIAN REVIEWED"


def _verified(orthanc: Orthanc, study_uid: str) -> list[dict[str, Any]]:
    return [i for i in by_class(orthanc.study_instances(study_uid), Comprehensive3DSRStorage)
            if i["SeriesDescription"] == REVIEWED]  # fmt: skip


def _decisions(d: DaemonProcess, run: str) -> list[dict[str, Any]]:
    shown = json.loads(d.cli("review", "show", run, "--json").stdout)
    return shown["decisions"]


def _login(page: Any, site: str, user: str) -> None:
    page.goto(f"{site}/")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", USER_PASSWORD)
    page.click("#login")
    page.wait_for_selector("#worklist")


def _open(page: Any, site: str, run: str) -> None:
    page.goto(f"{site}/results/{run}")
    # Functions, not expressions: the page's CSP allows no eval.
    page.wait_for_function("() => window.secondreaderViewer && window.secondreaderViewer.state"
                           ".meta && window.secondreaderViewer.state.slices[window"
                           ".secondreaderViewer.state.k]")  # fmt: skip


def _canvas_point(page: Any, col: float, row: float) -> tuple[float, float]:
    """Where image pixel (col, row) lies on the screen, from the viewer's own geometry."""
    return page.evaluate(
        """([col, row]) => {
            const c = document.getElementById('view'), v = window.secondreaderViewer.state;
            const px = v.slices[v.k], rect = c.getBoundingClientRect();
            const fit = Math.min(c.width / px.cols, c.height / px.rows) * v.zoom;
            const x0 = (c.width - px.cols * fit) / 2, y0 = (c.height - px.rows * fit) / 2;
            return [rect.left + (x0 + (col + 0.5) * fit) * rect.width / c.width,
                    rect.top + (y0 + (row + 0.5) * fit) * rect.height / c.height];
        }""",
        [col, row],
    )


def test_a_radiologist_reads_signs_undoes_amends_and_corrects(
    daemon_factory, orthanc_factory, tmp_path: Path
) -> None:
    orthanc: Orthanc = orthanc_factory().start()
    web_port = free_port()
    d = daemon_factory(delivery(orthanc) + f"\n[web]\nenabled = true\nport = {web_port}\n")
    d.config_path.write_text(d.config_path.read_text().replace(
        "[review]\n", f"[review]\nundo_seconds = {UNDO_SECONDS}\n", 1))  # fmt: skip
    d.cli("db", "upgrade")
    d.add_user("smith", "Smith^Jane")
    d.add_user("root", "Root^Admin", role="admin")
    d.start()
    studies = {"a": demo_ct(tmp_path / "a", seed=3), "b": demo_ct(tmp_path / "b", seed=5)}
    volume, _ = phantom_volume(21, n_slices=300, rows=256, cols=256, lesion=False)
    studies["long"] = write_ct_series(volume, tmp_path / "long", spacing=(1.0, 1.4, 1.4), seed=21)
    headers = {k: dcmread(v[0], stop_before_pixels=True) for k, v in studies.items()}
    uids = {k: str(h.StudyInstanceUID) for k, h in headers.items()}
    for files in studies.values():
        assert storescu(d.port, files).returncode == 0
    for uid in uids.values():
        d.wait_for(lambda u=uid: by_class(orthanc.study_instances(u), Comprehensive3DSRStorage),
                   timeout=300)  # fmt: skip
    listed = json.loads(d.cli("review", "list", "--state", "all", "--json").stdout)
    runs = {k: next(str(r["run_id"]) for r in listed if r["study_instance_uid"] == u)
            for k, u in uids.items()}  # fmt: skip

    site = f"http://127.0.0.1:{web_port}"
    with browser(width=1440, height=900) as page:
        urls: list[str] = []
        page.on("request", lambda r: urls.append(r.url))
        page.goto(f"{site}/")
        assert page.url.endswith("/login")
        _login(page, site, "smith")
        # The worklist matches the PACS: each study by patient and accession number.
        table = page.inner_text("#worklist")
        for h in headers.values():
            assert str(h.AccessionNumber) in table and str(h.PatientID) in table
            assert str(h.PatientName).split("^")[0] in table
        _save(page, tmp_path, "web-worklist.png")

        # -- Enter never signs ---------------------------------------------------
        a = runs["a"]
        _open(page, site, a)
        here = page.url
        page.fill("#finding-1 input[name=comment-1]", "calcified granuloma, benign")
        page.press("#finding-1 input[name=comment-1]", "Enter")
        page.check("#finding-1 input.reject")
        page.press("#finding-1 input.reject", "Enter")
        page.press("#finding-1 input[name=comment-1]", "Enter")
        page.focus("#viewer")
        page.keyboard.press("Enter")
        page.keyboard.press("Space")
        page.wait_for_timeout(500)  # what a submit would have needed to leave the page
        assert page.url == here and _decisions(d, a) == []
        assert _verified(orthanc, uids["a"]) == []

        # -- sign, undo inside the window: nothing reaches the PACS ---------------
        page.click("#review-sign")
        page.wait_for_selector("#sign-summary")
        summary = page.inner_text("#sign-summary")
        assert "REJECTED: stated absent" in summary and "calcified granuloma" in summary
        assert "Smith^Jane" in page.inner_text("#sign-reviewer")
        assert f"{UNDO_SECONDS} s after you sign" in page.inner_text("#sign-effect")
        _save(page, tmp_path, "web-sign.png")
        page.click("#sign")
        page.wait_for_selector("#undo-box")
        assert len(_decisions(d, a)) == 1
        page.click("#undo")
        page.wait_for_selector("#undone")
        assert _decisions(d, a) == []
        # -- sign again: the verified SR arrives once the window is over ----------
        page.check("#finding-1 input.confirm")
        page.fill("#finding-1 input[name=comment-1]", "solid nodule")
        page.click("#review-sign")
        page.click("#sign")
        page.wait_for_selector("#undo-box")
        first = d.wait_for(lambda: _verified(orthanc, uids["a"]), timeout=UNDO_SECONDS + 120)
        sr, _path = fetch(orthanc, first[0], tmp_path / "a-verified")
        # The SR of the undone rejection (same round, same UID) never went: present, confirmed.
        (finding,) = read_findings(sr)
        assert finding["present"] is True and sr.VerificationFlag == "VERIFIED"
        history = json.loads(d.cli("review", "show", a, "--json").stdout)["history"]
        assert "review.undone" in [e["event"] for e in history]

        # -- amend on the page, with a reason -------------------------------------
        page.goto(f"{site}/results/{a}")
        page.check("#amend input[name=amend-decision-1][value=reject]")
        page.fill("#amend-reason", "vessel seen end-on")
        page.press("#amend-reason", "Enter")  # a new line in the reason, never a submit
        page.fill("#amend input[name=amend-comment-1]", "second look")
        page.press("#amend input[name=amend-comment-1]", "Enter")
        assert page.url.endswith(f"/results/{a}") and len(_verified(orthanc, uids["a"])) == 1
        page.click("#amend-review")
        assert "vessel seen end-on" in page.inner_text("#sign-reason")
        page.click("#sign")
        page.wait_for_selector(".verifications")
        assert "vessel seen end-on" in page.inner_text(".verifications")
        superseding = d.wait_for(
            lambda: (found := _verified(orthanc, uids["a"])) and len(found) == 2 and found,
            timeout=120,
        )  # fmt: skip
        newer = next(i for i in superseding if i["ID"] != first[0]["ID"])
        amended, _ = fetch(orthanc, newer, tmp_path / "a-amended")
        assert predecessor(amended) == sr.SOPInstanceUID
        assert read_findings(amended)[0]["present"] is False

        # -- a correction: a marker placed by a click, moved by a drag ------------
        b = runs["b"]
        _open(page, site, b)
        x, y = _canvas_point(page, 100, 120)
        page.mouse.click(x, y)
        assert page.input_value("#finding-1 input[name=col-1]") == "100"
        assert page.input_value("#finding-1 input[name=row-1]") == "120"
        assert page.is_checked("#finding-1 input.correct")
        x2, y2 = _canvas_point(page, 110, 90)
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move((x + x2) / 2, (y + y2) / 2)
        page.mouse.move(x2, y2)
        page.mouse.up()
        col = float(page.input_value("#finding-1 input[name=col-1]"))
        row = float(page.input_value("#finding-1 input[name=row-1]"))
        assert abs(col - 110) <= 1 and abs(row - 90) <= 1  # moved with the drag
        page.evaluate("() => window.scrollTo(0, 0)")
        _save(page, tmp_path, "web-result-marker.png")
        assert _decisions(d, b) == []  # nothing signed yet
        page.click("#review-sign")
        assert "CORRECTED: stated present at column" in page.inner_text("#sign-summary")
        page.click("#sign-next")
        page.wait_for_selector("#signed-banner, #undo-box")
        assert f"/results/{b}" not in page.url  # the next case
        corrected = d.wait_for(lambda: _verified(orthanc, uids["b"]), timeout=UNDO_SECONDS + 120)
        sr_b, _ = fetch(orthanc, corrected[0], tmp_path / "b-verified")
        (finding,) = read_findings(sr_b)
        (point,) = finding["graphic_data"]
        assert abs(point[0] - col) < 0.5 and abs(point[1] - row) < 0.5

        # -- 300 slices with the wheel and the keys; presets ----------------------
        long = runs["long"]
        _open(page, site, long)
        page.wait_for_function("() => window.secondreaderViewer.state.loaded === 300",
                               timeout=180_000)  # fmt: skip
        page.focus("#viewer")
        page.keyboard.press("Home")
        for _ in range(299):
            page.keyboard.press("ArrowDown")
        assert page.evaluate("window.secondreaderViewer.state.k") == 299
        page.hover("#viewer")
        for _ in range(10):
            page.mouse.wheel(0, -120)
        page.wait_for_function("() => window.secondreaderViewer.state.k === 289")
        page.keyboard.press("k")
        page.keyboard.press("j")
        page.keyboard.press("j")
        assert page.evaluate("window.secondreaderViewer.state.k") == 290
        times = page.evaluate("window.secondreaderViewer.stats.changes")
        assert len(times) >= 299 + 10 + 3
        print(f"\nslice change from memory, {len(times)} changes of a 300-slice 256x256 CT: "
              f"median {statistics.median(times):.1f} ms, "
              f"p95 {sorted(times)[int(len(times) * 0.95)]:.1f} ms, max {max(times):.1f} ms")
        page.evaluate("window.secondreaderViewer.show(150)")
        lung = _lung_greys(page, "mediastinum"), _lung_greys(page, "lung")
        print(f"lung parenchyma grey (mean, sd): mediastinum {lung[0]}, lung {lung[1]}")
        assert lung[0][0] < 5 and lung[1][0] > 40 and lung[1][1] > lung[0][1]
        page.evaluate("() => window.scrollTo(0, 0)")
        _save(page, tmp_path, "web-result.png")
        page.click("#toggle-overlay")
        page.set_viewport_size({"width": 768, "height": 1024})
        page.goto(f"{site}/results/{a}")
        page.wait_for_selector("#viewer")
        _save(page, tmp_path, "web-result-768.png")
        page.goto(f"{site}/?state=all")
        state = page.locator("#worklist td.state").first.bounding_box()
        assert state is not None and state["x"] + state["width"] <= 768  # not cut off
        _save(page, tmp_path, "web-worklist-768.png")
        page.set_viewport_size({"width": 1440, "height": 900})

        page.click("#logout")
        page.wait_for_selector("#login")
        # The administrator's monitoring: one rejected (amended), one corrected.
        _login(page, site, "root")
        page.goto(f"{site}/admin/monitoring")
        overall = page.locator("#agreement tr", has_text="overall").inner_text().split()
        # AI present: confirmed 0, corrected 1 (b), rejected 1 (a, amended); PPV 1 of 2.
        assert overall[3:8] == ["0", "1", "1", "0.50", "(1/2)"], overall
        page.wait_for_function("() => document.getElementById('plot').naturalWidth > 0")
        _save(page, tmp_path, "web-monitoring.png")
        page.goto(f"{site}/admin")
        workers = page.inner_text("#workers")
        assert "worker" in workers and ("cpu" in workers or "cuda" in workers), workers
    for h in headers.values():
        for url in urls:
            assert str(h.PatientName) not in url and str(h.PatientID) not in url
    log = d.log()
    assert f"web page on http://127.0.0.1:{web_port}/" in log and "Logging error" not in log
    for h in headers.values():
        assert str(h.PatientName) not in log and str(h.PatientID) not in log
    assert d.stop() == 0


def _lung_greys(page: Any, preset: str) -> tuple[float, float]:
    """Mean and SD of the rendered grey over the lung parenchyma (HU -950 to -700)."""
    page.click(f"#preset-{preset}")
    mean, sd = page.evaluate(
        """() => {
            const v = window.secondreaderViewer, px = v.state.slices[v.state.k];
            const grey = v.rendered();
            let n = 0, s = 0, s2 = 0;
            for (let i = 0; i < px.data.length; i++) {
                if (px.data[i] < -950 || px.data[i] > -700) continue;
                n++; s += grey[i]; s2 += grey[i] * grey[i];
            }
            const m = s / n;
            return [m, Math.sqrt(Math.max(0, s2 / n - m * m))];
        }"""
    )
    return round(mean, 1), round(sd, 1)
