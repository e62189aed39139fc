"""A segmentation model's lesion in OHIF 3.13.2: the SEG as an overlay, the volume as a measurement.

A demo CT with a phantom nodule at a known place goes to Orthanc with two
objects built here from the nodule's true mask (tests/lesion_objects.py):
a BINARY SEG (one segment) and a TID 1500 SR measuring it (TID 1411 with
the segment, and a TID 1411 twin by the lesion's box on each slice). OHIF,
served on loopback (tests/viewer.py), opens the study in headless Chromium:

* the SEG's colour lies where the nodule is, in millimetres: from the pixels
  OHIF renders and its own canvas-to-patient mapping, slice by slice,
  against the phantom's mask;
* the SR shows the volume we wrote beside the lesion ("Volume: 2.43 ml"),
  and once tracked OHIF's one measurement carries it in its label, its box
  lying around the nodule on its largest slice, in millimetres;
* the SR passes dciodvfy and PixelMed's TID 1500 check, the SEG dciodvfy;
* OHIF prints no console error. (It warns "Unable to generate tool state"
  for the segment group when tracking: its adapters want a SCOORD.)

Screenshots go to the test's folder.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from model.phantom import phantom_nodule_mask
from tests.conftest import storescu
from tests.dicom_validate import dciodvfy_errors, pixelmed_sr_errors
from tests.lesion_objects import (
    SEG_DESCRIPTION,
    SR_DESCRIPTION,
    largest_slice,
    lesion_label,
    lesion_seg,
    lesion_sr,
)
from tests.orthanc import Orthanc
from tests.test_review_orthanc import demo_ct
from tests.viewer import (
    ORTHANC_DICOMWEB,
    View,
    ViewerServer,
    browser,
    colour_through_volume,
    new_page,
    show_slice,
    view,
    view_when_shown,
)

WAIT_MS = 90_000  # SwiftShader on two cores: a ceiling, not a wait
SEED = 3
SPACING = (2.5, 1.4, 1.4)  # slice, row, column (mm), as demo_ct writes them
# OHIF draws a segment half transparent: its colour over grey is paler than
# the parametric map's, but any spread at all is colour on a grey CT.
SEG_SPREAD = 30


def _until(check: Any, timeout: float = WAIT_MS / 1000) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def _patient_points(header: Dataset, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    iop = np.asarray(header.ImageOrientationPatient, dtype=float)
    dy, dx = (float(v) for v in header.PixelSpacing)
    origin = np.asarray(header.ImagePositionPatient, dtype=float)
    return (
        origin
        + np.asarray(columns, dtype=float)[:, None] * dx * iop[:3]
        + np.asarray(rows, dtype=float)[:, None] * dy * iop[3:]
    )


def _measures(sources: list[Dataset], mask: np.ndarray) -> dict[str, float]:
    """The lesion's true volume (ml), longest axial diameter (mm), mean and maximum HU."""
    hu = np.stack([s.pixel_array * float(s.RescaleSlope) + float(s.RescaleIntercept)
                   for s in sources])  # fmt: skip
    longest = 0.0
    for k in np.nonzero(mask.any(axis=(1, 2)))[0]:
        rows, columns = np.nonzero(mask[k])
        points = _patient_points(sources[k], rows, columns)
        gaps = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)
        longest = max(longest, float(gaps.max()))
    return {
        "volume_ml": float(mask.sum()) * float(np.prod(SPACING)) / 1000.0,
        "diameter_mm": longest,
        "mean_hu": float(hu[mask].mean()),
        "max_hu": float(hu[mask].max()),
    }


def _upload(orthanc: Orthanc, path: Path) -> None:
    """Store a file through Orthanc's REST API (storescu proposes no SEG context by default)."""
    request = urllib.request.Request(orthanc.url + "/instances", data=path.read_bytes())
    with urllib.request.urlopen(request, timeout=60) as rsp:
        assert json.loads(rsp.read())["Status"] == "Success"


def _shown(page: Any, wanted: Any) -> View | None:
    shown = view_when_shown(page)
    return shown if shown is not None and wanted(shown) else None


def _open_study(page: Any, viewer: ViewerServer, study_uid: str, first: bool) -> None:
    page.goto(f"{viewer.url}/viewer?StudyInstanceUIDs={study_uid}")
    page.locator('[data-cy="studyBrowser-panel"]').wait_for(timeout=WAIT_MS)
    if first:
        page.get_by_text("Skip all", exact=True).click(timeout=WAIT_MS)
    page.get_by_text("Confirm and hide", exact=True).click(timeout=WAIT_MS)
    page.wait_for_load_state("networkidle", timeout=WAIT_MS)


def _seg_shown(page: Any) -> bool:
    """OHIF has the SEG as a segmentation drawn in the active viewport."""
    return bool(page.evaluate(
        """() => {
          const s = window.services;
          const id = s.viewportGridService.getState().activeViewportId;
          return s.segmentationService.getSegmentationRepresentations(id).length > 0;
        }"""
    ))  # fmt: skip


def _mask_points(sources: list[Dataset], mask: np.ndarray, k: int) -> np.ndarray:
    rows, columns = np.nonzero(mask[k])
    return _patient_points(sources[k], rows, columns)


def _check_seg_position(
    planes: list[tuple[float, np.ndarray]],
    sources: list[Dataset],
    mask: np.ndarray,
    normal: np.ndarray,
) -> dict[str, float]:
    """OHIF's segment colour, plane by plane, against the true mask, in mm; the figures."""
    positions = [float(np.dot(normal, s.ImagePositionPatient)) for s in sources]
    on_mask = {positions[k] for k in np.nonzero(mask.any(axis=(1, 2)))[0]}
    coloured_at = {round(p, 2) for p, points in planes if len(points)}
    # Colour on exactly the slices the nodule is on.
    assert coloured_at == {round(p, 2) for p in on_mask}, (coloured_at, on_mask)
    figures: dict[str, float] = {}
    step = float(SPACING[1])
    for plane, points in planes:
        if not len(points):
            continue
        k = min(range(len(sources)), key=lambda i: abs(positions[i] - plane))
        truth = _mask_points(sources, mask, k)
        # Pixel centres of the mask against the canvas pixels OHIF coloured:
        # the drawn area is the voxels' own, half a voxel beyond their centres.
        centre = float(np.linalg.norm(points.mean(axis=0)[:2] - truth.mean(axis=0)[:2]))
        spread = np.ptp(points[:, :2], axis=0) - (np.ptp(truth[:, :2], axis=0) + step)
        figures[f"slice {k}: centre off (mm)"] = round(centre, 2)
        figures[f"slice {k}: extent off (mm)"] = round(float(np.abs(spread).max()), 2)
        assert centre < step / 2, figures
        assert np.abs(spread).max() < step, figures
    return figures


def _tracked(page: Any) -> list[dict[str, Any]]:
    """OHIF's measurements: tool, label and the annotation's points in patient mm."""
    return list(page.evaluate(
        """() => window.services.measurementService.getMeasurements().map(m => ({
          toolName: m.toolName, label: m.label,
          points: m.points || (m.data && m.data.handles && m.data.handles.points) || [],
        }))"""
    ))  # fmt: skip


def test_ohif_overlays_the_seg_and_shows_the_volume(tmp_path: Path, orthanc_factory) -> None:
    orthanc = orthanc_factory(extra=ORTHANC_DICOMWEB).start()
    files = demo_ct(tmp_path / "ct", seed=SEED)
    sources: list[Dataset] = [dcmread(f) for f in files]  # slice k in file k
    mask = phantom_nodule_mask(SEED, n_slices=len(files), rows=256, cols=256, spacing=SPACING)
    numbers = _measures(sources, mask)
    seg = lesion_seg(sources, mask, **numbers)
    sr = lesion_sr(sources, seg, mask, **numbers)
    paths = {"seg": tmp_path / "seg.dcm", "sr": tmp_path / "sr.dcm"}
    seg.save_as(paths["seg"])
    sr.save_as(paths["sr"])
    assert dciodvfy_errors(paths["seg"]) == []
    assert dciodvfy_errors(paths["sr"]) == []
    assert pixelmed_sr_errors(paths["sr"]) == []
    assert storescu(orthanc.dicom_port, files, aec=orthanc.aet).returncode == 0
    for path in paths.values():
        _upload(orthanc, path)
    study_uid = str(sources[0].StudyInstanceUID)
    largest = largest_slice(mask)
    volume = f"Volume: {numbers['volume_ml']:.2f} ml"

    with ViewerServer(orthanc.url) as viewer, browser() as page:
        # -- The SEG: OHIF asks, then draws it over its CT.
        _open_study(page, viewer, study_uid, first=True)
        page.get_by_text(SEG_DESCRIPTION, exact=False).first.dblclick()
        page.get_by_role("button", name="Yes").click(timeout=WAIT_MS)
        assert _until(lambda: _seg_shown(page)), page.console[-20:]
        # The whole CT under it (the views below wait for their own renders).
        stack = _until(lambda: _shown(page, lambda v: v.slices == len(files)))
        assert stack, vars(view(page))
        planes = colour_through_volume(page, spread=SEG_SPREAD)
        figures = _check_seg_position(planes, sources, mask, view(page).normal)
        print(f"SEG, measured in OHIF: {figures}")
        plane = float(np.dot(view(page).normal, sources[largest].ImagePositionPatient))
        show_slice(page, next(i for i, (p, _) in enumerate(planes) if abs(p - plane) < 0.01))
        page.screenshot(path=str(tmp_path / "ohif-seg.png"))
        errors = [m for m in page.console if m.startswith(("error", "pageerror"))]
        assert errors == [], errors

        # -- The SR: the volume beside the lesion, then one tracked measurement.
        page.close()
        page = new_page(page)
        _open_study(page, viewer, study_uid, first=False)
        panel = page.locator('[data-cy="trackedMeasurements-panel"]').first
        if not panel.is_visible():
            page.locator('[data-cy="trackedMeasurements-btn"]').click()
        panel.wait_for(timeout=WAIT_MS)
        page.get_by_text(SR_DESCRIPTION, exact=False).first.dblclick()
        pane = page.locator('[data-cy="viewport-pane"]').first
        assert _until(lambda: volume in pane.inner_text()), pane.inner_text()
        assert f"Long axis: {numbers['diameter_mm']:.2f} mm" in pane.inner_text()
        # On the lesion's largest slice.
        shown = view(page)
        key_plane = float(np.dot(shown.normal, sources[largest].ImagePositionPatient))
        assert abs(shown.plane - key_plane) < 0.01, (shown.plane, key_plane)
        page.screenshot(path=str(tmp_path / "ohif-sr.png"))
        page.get_by_role("button", name="Yes").click(timeout=WAIT_MS)  # track it
        title = page.locator('[data-cy="data-row-title"]')
        title.first.wait_for(timeout=WAIT_MS)
        label = lesion_label(numbers["volume_ml"], numbers["diameter_mm"])
        assert title.count() == 1 and title.inner_text().strip() == label
        (tracked,) = _until(lambda: _tracked(page))
        print(f"OHIF tracks: {tracked}")
        assert tracked["toolName"] == "RectangleROI" and tracked["label"] == label
        _check_box(np.asarray(tracked["points"], dtype=float), sources[largest], mask[largest])
        page.screenshot(path=str(tmp_path / "ohif-sr-tracked.png"))
        errors = [m for m in page.console if m.startswith(("error", "pageerror"))]
        assert errors == [], errors
        print("\n".join(m for m in page.console if m.startswith("warning")))


def _check_box(points: np.ndarray, image: Dataset, on_slice: np.ndarray) -> None:
    """The tracked box: on the largest slice's plane, around the nodule's pixels there, in mm."""
    assert points.shape == (4, 3), points
    normal = np.cross(*np.asarray(image.ImageOrientationPatient, dtype=float).reshape(2, 3))
    plane = float(np.dot(normal, image.ImagePositionPatient))
    assert np.allclose(points @ normal, plane, atol=0.01), points
    rows, columns = np.nonzero(on_slice)
    truth = _patient_points(image, rows, columns)
    half = float(SPACING[1]) / 2  # the box runs along the outer pixel edges
    assert np.allclose(points[:, :2].min(axis=0), truth[:, :2].min(axis=0) - half, atol=0.01)
    assert np.allclose(points[:, :2].max(axis=0), truth[:, :2].max(axis=0) + half, atol=0.01)
