"""What a radiologist sees: our objects in OHIF 3.13.2, read from Orthanc over DICOMweb.

A real daemon analyses two demo CTs (one with a nodule, one without) sent by
storescu, and delivers its default outputs (SR, parametric map, GSPS,
summary image) to Orthanc, which has the images too. OHIF, served on
loopback (tests/viewer.py), opens the studies in headless Chromium:

* the AI SR hydrates into one tracked measurement whose label is our
  sentence, "AI, NOT VERIFIED" first, still legible where OHIF's panel cuts
  it off; OHIF's own statistics of the region show the nodule inside it;
* the parametric map is coloured where the nodule is, measured in
  millimetres from the pixels OHIF renders and its own screen-to-patient
  mapping (never from its "I:" slice label, which counts from the other end
  in that view), against the nodule's known position in the phantom; its
  hottest point lies as near the nodule as Grad-CAM's resolution allows;
* the summary image opens as a still image (no cine player over its banner)
  and shows what OHIF's window does to it after the map;
* the negative study's AI SR opens on its key slice without an error, and
  its finding reads "AI, NOT VERIFIED: Nodule absent ..." once tracked; its
  summary image says "No nodule found" with the probability, read off the
  screen by tesseract;
* both SRs, as Orthanc holds them, pass dciodvfy and PixelMed's TID 1500 check;
* none of the console errors OHIF gave for our earlier objects comes back.

Screenshots go to the test's folder, and to $SECONDREADER_SCREENSHOTS if set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_io.sr import read_findings
from dicom_io.synthetic import write_ct_series
from model.phantom import phantom_nodule_mask, phantom_volume
from tests.conftest import DaemonProcess, storescu
from tests.dicom_validate import dciodvfy_errors, pixelmed_sr_errors
from tests.ocr import read_text
from tests.orthanc import Orthanc
from tests.test_orthanc import by_class, fetch
from tests.test_review_orthanc import delivery, demo_ct
from tests.viewer import (
    DISPLAY_SET_MESSAGES,
    ORTHANC_DICOMWEB,
    View,
    ViewerServer,
    browser,
    canvas_pixels,
    colour_through_volume,
    coloured,
    display_set_messages,
    new_page,
    show_slice,
    view,
    view_when_shown,
)

# What OHIF said about our earlier objects (issues 9 and 29); none may come back.
KNOWN_ERRORS = (
    "No spatial coordinates group found",
    "Didn't find any tracked measurements",
    "Fractional segmentations are not yet supported",
    "ContentSequence array contains no SCOORD",
    "Invalid typed array length",
    "Error loading displaySet",
    "Unable to generate tool state",
    # OHIF's error boundary: the viewport goes black ("Route viewer Error
    # Boundary TypeError: ... reading 'ReferencedSOPSequence'").
    "Error Boundary",
)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
PMAP_CLASS = "1.2.840.10008.5.1.4.1.1.30"
SUMMARY_CLASS = "1.2.840.10008.5.1.4.1.1.7"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
WAIT_MS = 90_000  # SwiftShader on two cores: generous, and only a ceiling
SEED = 3  # the positive demo CT's phantom (tests/test_review_orthanc.demo_ct)
SPACING = (2.5, 1.4, 1.4)  # its slice, row and column spacing, mm
# The map's resolution: Grad-CAM explains the built-in CT model's last
# feature map, 16 x 16 cells over the field of view (model/networks.py), so
# 256 x 1.4 mm / 16 = 22.4 mm cells here. Its peak is the centre of the
# cell(s) holding the evidence: within half a cell's diagonal of the lesion.
CELL_MM = 256 * SPACING[2] / 16
HALF_CELL_DIAGONAL_MM = CELL_MM * np.sqrt(2) / 2


REVIEWED = "AI RESULT - PHYSICIAN REVIEWED"


def _study_count(orthanc: Orthanc, study_uid: str) -> int:
    study_id = orthanc.find_study(study_uid)
    return len(orthanc.get(f"/studies/{study_id}/instances")) if study_id else 0


def _save(page: Any, folder: Path, name: str) -> Path:
    path = folder / name
    page.screenshot(path=str(path))
    extra = os.environ.get("SECONDREADER_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / name)
    return path


def _open_study(page: Any, viewer: ViewerServer, study_uid: str, first: bool) -> None:
    page.goto(f"{viewer.url}/viewer?StudyInstanceUIDs={study_uid}")
    page.locator('[data-cy="studyBrowser-panel"]').wait_for(timeout=WAIT_MS)
    if first:
        # A new browser profile: OHIF's tour covers the page until dismissed
        # (remembered in the profile for the later pages).
        page.get_by_text("Skip all", exact=True).click(timeout=WAIT_MS)
    # The investigational-use banner: shown once in every new page (session).
    page.get_by_text("Confirm and hide", exact=True).click(timeout=WAIT_MS)
    # The series OHIF opens by itself has loaded before a test opens another:
    # switching while its images are in flight cancels them, and OHIF 3.13.2's
    # IMAGE_LOAD_ERROR listener then throws ("handler is not a function"), as a
    # CI run saw once on a loaded machine.
    page.wait_for_load_state("networkidle", timeout=WAIT_MS)


def _open_series(page: Any, description: str) -> None:
    """Double-click a series in the study browser (thumbnail or list row)."""
    page.get_by_text(description, exact=False).first.dblclick()


def _until(check: Any, timeout: float = WAIT_MS / 1000) -> Any:
    """Poll `check` until it returns something true (a ceiling, not a wait)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def _shown(page: Any, wanted: Any) -> View | None:
    """The active viewport's view if it shows what `wanted` checks, else None."""
    shown = view_when_shown(page)
    return shown if shown is not None and wanted(shown) else None


def _known_errors(console: list[str]) -> list[str]:
    return [m for m in console if any(e in m for e in KNOWN_ERRORS)]


def _patient_position(header: Dataset, row: float, column: float) -> np.ndarray:
    """Patient coordinates (mm) of pixel (row, column) of a slice: centre of pixel (0, 0) at IPP."""
    iop = np.asarray(header.ImageOrientationPatient, dtype=float)
    dy, dx = (float(v) for v in header.PixelSpacing)
    origin = np.asarray(header.ImagePositionPatient, dtype=float)
    return origin + column * dx * iop[:3] + row * dy * iop[3:]


def _lesion_centre(files: list[Path]) -> np.ndarray:
    """The nodule's centre in patient coordinates: its phantom mask, on the written slices."""
    mask = phantom_nodule_mask(SEED, n_slices=len(files), rows=256, cols=256, spacing=SPACING)
    headers = [dcmread(f, stop_before_pixels=True) for f in files]  # slice k in file k
    points = [
        _patient_position(headers[k], r, c) for k, r, c in zip(*np.nonzero(mask), strict=True)
    ]
    return np.mean(points, axis=0)


def _instance_at(files: list[Path], plane: float, normal: np.ndarray, spacing: float) -> int:
    """The Instance Number of the slice at `plane` mm along `normal`."""
    for f in files:
        header = dcmread(f, stop_before_pixels=True)
        if abs(float(np.dot(normal, header.ImagePositionPatient)) - plane) <= spacing / 2:
            return int(header.InstanceNumber)
    raise AssertionError(f"no slice at {plane} mm")


def _hottest_point(pmap: Dataset) -> np.ndarray:
    """Patient coordinates of the parametric map's highest value, from its own frame geometry."""
    frames = pmap.pixel_array.reshape(int(pmap.NumberOfFrames), pmap.Rows, pmap.Columns)
    k, row, column = np.unravel_index(int(np.argmax(frames)), frames.shape)
    shared = pmap.SharedFunctionalGroupsSequence[0]
    frame = Dataset()
    frame.ImageOrientationPatient = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    frame.PixelSpacing = shared.PixelMeasuresSequence[0].PixelSpacing
    position = pmap.PerFrameFunctionalGroupsSequence[k].PlanePositionSequence[0]
    frame.ImagePositionPatient = position.ImagePositionPatient
    return _patient_position(frame, float(row), float(column))


def _check_map_position(page: Any, lesion: np.ndarray, spacing: float) -> dict[str, float]:
    """Where OHIF colours the map, against the lesion, in mm; the figures, for the record."""
    planes = colour_through_volume(page)
    normal = view(page).normal
    lesion_plane = float(np.dot(normal, lesion))
    coloured_planes = [(plane, points) for plane, points in planes if len(points)]
    assert coloured_planes, "OHIF shows no colour on any slice"
    everything = np.concatenate([points for _, points in coloured_planes])
    centre = everything.mean(axis=0)
    # The slice through the nodule's centre is coloured, around the nodule.
    plane, on_lesion = min(planes, key=lambda p: abs(p[0] - lesion_plane))
    figures = {
        "colour_centre_to_lesion_mm": float(np.linalg.norm(centre - lesion)),
        "colour_centre_along_normal_mm": float(np.dot(normal, centre) - lesion_plane),
        "colour_on_lesion_slice_pixels": float(len(on_lesion)),
        "colour_span_on_lesion_slice_mm": (
            float(np.ptp(on_lesion[:, :2], axis=0).max()) if len(on_lesion) else 0.0
        ),
    }
    assert abs(plane - lesion_plane) <= spacing / 2
    assert len(on_lesion) > 1000, f"no colour on the nodule's slice: {figures}"
    in_plane = on_lesion.mean(axis=0) - lesion
    in_plane -= np.dot(in_plane, normal) * normal
    figures["colour_centre_on_lesion_slice_mm"] = float(np.linalg.norm(in_plane))
    # The map's colour is centred on the nodule: through the volume within a
    # slice, and in plane within the map's resolution.
    assert abs(figures["colour_centre_along_normal_mm"]) < spacing, figures
    assert figures["colour_centre_on_lesion_slice_mm"] < HALF_CELL_DIAGONAL_MM, figures
    assert figures["colour_centre_to_lesion_mm"] < HALF_CELL_DIAGONAL_MM, figures
    return figures


def test_ohif_hydrates_the_sr_overlays_the_map_and_shows_the_summary(
    tmp_path: Path, daemon_factory, orthanc_factory
) -> None:
    orthanc = orthanc_factory(extra=ORTHANC_DICOMWEB).start()
    d: DaemonProcess = daemon_factory(delivery(orthanc)).start()
    positive = demo_ct(tmp_path / "positive", seed=SEED)
    volume, _ = phantom_volume(11, n_slices=40, rows=256, cols=256, lesion=False)
    negative = write_ct_series(volume, tmp_path / "negative", spacing=SPACING, seed=11)
    uids = []
    for files in (positive, negative):
        # The modality sends to the PACS and to us; we send our results to the PACS.
        assert storescu(d.port, files).returncode == 0
        assert storescu(orthanc.dicom_port, files, aec=orthanc.aet).returncode == 0
        uids.append(str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID))
    pos_uid, neg_uid = uids
    # Positive: SR, parametric map, GSPS, summary. Negative: SR and summary.
    d.wait_for(lambda: _study_count(orthanc, pos_uid) == len(positive) + 4, timeout=300)
    d.wait_for(lambda: _study_count(orthanc, neg_uid) == len(negative) + 2, timeout=300)
    pos_objects = orthanc.study_instances(pos_uid)
    assert {c: len(by_class(pos_objects, c)) for c in (PMAP_CLASS, GSPS_CLASS)} == {
        PMAP_CLASS: 1,
        GSPS_CLASS: 1,
    }
    from_orthanc = tmp_path / "from-orthanc"
    (sr_entry,) = by_class(pos_objects, SR_CLASS)
    sr, sr_path = fetch(orthanc, sr_entry, from_orthanc)
    (finding,) = read_findings(sr)
    assert finding["present"] and finding["comment"]
    label = finding["comment"]
    assert label.startswith("AI, NOT VERIFIED: Nodule present, ")
    (neg_sr_entry,) = by_class(orthanc.study_instances(neg_uid), SR_CLASS)
    neg_sr, neg_sr_path = fetch(orthanc, neg_sr_entry, from_orthanc)
    (neg_finding,) = read_findings(neg_sr)
    assert neg_finding["present"] is False
    # "AI, NOT VERIFIED: Nodule absent, 3 % (threshold 30.6 %) - ..." -> "3 %"
    neg_percent = neg_finding["comment"].split("absent, ")[1].split(" (")[0]
    # Both SRs as the PACS holds them: valid for dciodvfy and, as TID 1500, for PixelMed.
    for path in (sr_path, neg_sr_path):
        assert dciodvfy_errors(path) == []
        assert pixelmed_sr_errors(path) == []
    (pmap_entry,) = by_class(pos_objects, PMAP_CLASS)
    pmap, _ = fetch(orthanc, pmap_entry, from_orthanc)
    lesion = _lesion_centre(positive)
    # What the map means (README): Grad-CAM, whose hottest point is the
    # centre of the feature-map cell holding the evidence, not the nodule's.
    hottest_mm = float(np.linalg.norm(_hottest_point(pmap) - lesion))
    assert hottest_mm < HALF_CELL_DIAGONAL_MM, hottest_mm
    neg_key = next(
        dcmread(f, stop_before_pixels=True)
        for f in negative
        if dcmread(f, stop_before_pixels=True).SOPInstanceUID
        == neg_finding["referenced_sop_instance_uid"]
    )

    with ViewerServer(orthanc.url) as viewer, browser() as page:
        # -- The AI SR: hydrated into one tracked measurement with our label.
        _open_study(page, viewer, pos_uid, first=True)
        # The measurement panel first: opening it later narrows the viewport
        # under an annotation already drawn.
        panel = page.locator('[data-cy="trackedMeasurements-panel"]').first
        if not panel.is_visible():
            page.locator('[data-cy="trackedMeasurements-btn"]').click()
        panel.wait_for(timeout=WAIT_MS)
        _open_series(page, "AI RESULT - NOT VERIFIED")
        # Before tracking: OHIF's own lines beside the box, not our label.
        pane = page.locator('[data-cy="viewport-pane"]').first
        assert _until(lambda: "Probability:" in pane.inner_text()), pane.inner_text()
        assert f"Probability: {100 * finding['probability']:.2f} %" in pane.inner_text()
        assert "363698007: Lung" in pane.inner_text()
        page.get_by_role("button", name="Yes").click(timeout=WAIT_MS)  # track this SR
        title = page.locator('[data-cy="data-row-title"]')
        title.first.wait_for(timeout=WAIT_MS)
        assert "Measurements (1)" in panel.inner_text()
        assert title.count() == 1 and title.inner_text().strip() == label
        # OHIF cuts the label after two lines; what it shows still says it.
        title.first.screenshot(path=str(tmp_path / "label.png"))
        shown_label = read_text(tmp_path / "label.png")
        assert "NOT VERIFIED" in shown_label and "Nodule present" in shown_label, shown_label
        # The row's details: finding site and finding, in words.
        details = _until(lambda: "Lung" in panel.inner_text() and panel.inner_text())
        assert details and "Nodule" in details, panel.inner_text()
        # OHIF's own statistics of our region, drawn beside it on the key
        # slice: the nodule (soft tissue, HU above zero) is inside the box, in
        # a lung of air (-850 HU).
        pane = page.locator('[data-cy="viewport-pane"]')
        stats = _until(lambda: re.search(r"Max:\s*(-?[\d.]+)\s*HU", pane.inner_text()))
        _save(page, tmp_path, "ohif-sr-measurement.png")
        assert stats is not None, pane.inner_text()
        assert float(stats.group(1)) > 0.0, pane.inner_text()
        # Once tracked, the image carries OHIF's statistics and no label.
        assert "NOT VERIFIED" not in pane.inner_text() and "Probability" not in pane.inner_text()
        assert _known_errors(page.console) == []

        # -- The parametric map, in a page of its own (no measurement drawn
        # over it): coloured where the nodule is, in millimetres.
        page.close()
        page = new_page(page)
        _open_study(page, viewer, pos_uid, first=False)
        _open_series(page, "AI SALIENCY MAP - NOT VERIFIED")
        page.get_by_text("Loading Parametric Map").wait_for(state="detached", timeout=WAIT_MS)
        # The CT volume with the map over it, drawn at least once.
        fused = _until(lambda: _shown(page, lambda v: v.actors == 2 and v.renders > 0))
        assert fused and fused.slices == len(positive), view_when_shown(page)
        figures = _check_map_position(page, lesion, spacing=SPACING[0])
        print(f"parametric map, measured in OHIF: {figures}; hottest point {hottest_mm:.1f} mm")
        # The screenshot: the slice through the nodule's centre.
        normal = view(page).normal
        stack = view(page)
        planes = [show_slice(page, i).plane for i in (0, stack.slices - 1)]
        step = (planes[1] - planes[0]) / (stack.slices - 1)
        nodule_slice = round((float(np.dot(normal, lesion)) - planes[0]) / step)
        show_slice(page, nodule_slice)
        assert coloured(canvas_pixels(page)).sum() > 1000
        _save(page, tmp_path, "ohif-parametric-map.png")
        # OHIF's window for the map, and its slice number, which here is not
        # the instance number of the slice shown (the nodule's).
        overlay = page.locator('[data-cy="viewport-pane"]').first.inner_text()
        assert re.search(r"W:\s*100\s*L:\s*50", overlay), overlay
        nodule_instance = _instance_at(positive, float(np.dot(normal, lesion)), normal, SPACING[0])
        shown_number = re.search(r"I:\s*(\d+)", overlay)
        assert shown_number and int(shown_number.group(1)) != nodule_instance, overlay
        assert not [m for m in page.console if m.startswith(("error", "pageerror"))]

        # -- The summary image after the map, in the same viewport: a still
        # image (no cine player over its banner); OHIF 3.13.2 keeps the map's
        # window on it (README), and Reset gives it its own.
        thumbnail = page.locator('[data-cy="study-browser-thumbnail"]', has_text="AI SUMMARY")
        thumbnail.first.dblclick()
        summary = _until(lambda: _shown(page, lambda v: v.slices == 1 and v.modality == "CT"))
        assert summary, view(page).__dict__
        assert page.locator('[data-cy="cine-player-close"]').count() == 0
        # Its thumbnail's warning sign: OHIF's, for any single CT image without a position.
        assert display_set_messages(page, "AI SUMMARY") == [
            DISPLAY_SET_MESSAGES[2],
            DISPLAY_SET_MESSAGES[3],
        ]
        # OHIF lists the GSPS with its warning sign and never displays it.
        assert display_set_messages(page, "AI ANNOTATION") == [
            f"SOP Class UID {GSPS_CLASS} is not supported."
        ]
        assert summary.voi == {"lower": 0, "upper": 99}, summary.voi  # the map's W100/L50
        _save(page, tmp_path, "ohif-summary-after-map.png")
        page.locator('[data-cy="viewport-pane"]').first.click()
        page.keyboard.press("Space")  # OHIF's Reset
        reset = _until(lambda: _shown(page, lambda v: v.voi != summary.voi))
        assert reset and reset.voi == {"lower": 0, "upper": 255}, view(page).voi
        print(f"summary image: after the map {summary.voi}, after Reset {reset.voi}")
        assert page.locator('[data-cy="cine-player-close"]').count() == 0
        assert _known_errors(page.console) == []

        # -- The negative study, in a page of its own.
        page.close()
        page = new_page(page)
        _open_study(page, viewer, neg_uid, first=False)
        # Its AI SR: the key slice (where the model scored highest), framed
        # whole, with OHIF's probability beside it; no error boundary.
        _open_series(page, "AI RESULT - NOT VERIFIED")
        pane = page.locator('[data-cy="viewport-pane"]').first
        drawn = _until(lambda: "Probability:" in pane.inner_text() and pane.inner_text())
        assert drawn, pane.inner_text()
        assert f"Probability: {100 * neg_finding['probability']:.2f} %" in drawn
        assert "363698007: Lung" in drawn
        # The frame is the whole key image: no spot.
        whole = [(0.0, 0.0), (256.0, 0.0), (256.0, 256.0), (0.0, 256.0), (0.0, 0.0)]
        assert neg_finding["graphic_data"] == whole
        key_plane = float(np.dot(view(page).normal, neg_key.ImagePositionPatient))
        assert abs(view(page).plane - key_plane) < 0.01
        _save(page, tmp_path, "ohif-negative-sr.png")
        assert _known_errors(page.console) == []
        page.get_by_role("button", name="Yes").click(timeout=WAIT_MS)  # track it
        panel = page.locator('[data-cy="trackedMeasurements-panel"]').first
        if not panel.is_visible():
            page.locator('[data-cy="trackedMeasurements-btn"]').click()
        title = page.locator('[data-cy="data-row-title"]')
        title.first.wait_for(timeout=WAIT_MS)
        assert title.inner_text().strip() == neg_finding["comment"]
        assert neg_finding["comment"].startswith("AI, NOT VERIFIED: Nodule absent, ")
        assert _until(lambda: "mm²" in panel.inner_text()), panel.inner_text()  # OHIF's area

        # Its summary image says so, with the probability: read off the screen.
        thumbnail = page.locator('[data-cy="study-browser-thumbnail"]', has_text="AI SUMMARY")
        thumbnail.first.dblclick()
        overlay = page.locator('[data-cy="viewport-overlay-bottom-right"]')
        # The viewport holds the one summary image ("1/1"), not a CT slice of 40.
        one_of_one = re.compile(r"(?<!\d)1/1(?!\d)")
        assert _until(lambda: one_of_one.search(overlay.inner_text())), overlay.inner_text()
        assert page.locator('[data-cy="cine-player-close"]').count() == 0
        page.mouse.move(0, 0)

        def summary_text() -> str | None:
            _save(page, tmp_path, "ohif-negative-summary.png")
            page.locator('[data-cy="viewport-pane"]').first.screenshot(
                path=str(tmp_path / "viewport.png")
            )
            text = read_text(tmp_path / "viewport.png")
            wanted = ("No nodule found", f"Nodule absent, {neg_percent}", "NOT VERIFIED")
            return text if all(w in text for w in wanted) else None

        text = _until(summary_text) or read_text(tmp_path / "viewport.png")
        assert "No nodule found" in text, text
        assert f"Nodule absent, {neg_percent}" in text, text
        assert "NOT VERIFIED" in text, text
        assert _known_errors(page.console) == []

        # -- The physician rejects the positive finding: the verified SR frames its
        # whole key image (no spot), and OHIF opens it like the negative AI SR.
        d.add_user("smith", "Smith^Jane")
        runs = json.loads(d.cli("review", "list", "--json").stdout)
        run = next(str(r["run_id"]) for r in runs if r["study_instance_uid"] == pos_uid)
        d.cli("review", "reject", run, "--reviewer", "smith", "--comment", "vessel")
        def reviewed_srs() -> list[dict[str, Any]]:
            srs = by_class(orthanc.study_instances(pos_uid), SR_CLASS)
            return [i for i in srs if i["SeriesDescription"] == REVIEWED]

        reviewed = d.wait_for(reviewed_srs, timeout=120)
        verified, verified_path = fetch(orthanc, reviewed[0], from_orthanc)
        (rejected,) = read_findings(verified)
        assert rejected["present"] is False and len(rejected["graphic_data"]) == 5
        assert pixelmed_sr_errors(verified_path) == [] and dciodvfy_errors(verified_path) == []
        page.close()
        page = new_page(page)
        _open_study(page, viewer, pos_uid, first=False)
        _open_series(page, REVIEWED)
        pane = page.locator('[data-cy="viewport-pane"]').first
        drawn = _until(lambda: "Probability:" in pane.inner_text() and pane.inner_text())
        assert drawn, pane.inner_text()
        _save(page, tmp_path, "ohif-verified-rejected.png")
        assert _known_errors(page.console) == []
    assert d.stop() == 0
