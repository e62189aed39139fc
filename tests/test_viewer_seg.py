"""A segmentation model's lesion in OHIF 3.13.2: the SEG as an overlay, the volume as a measurement.

The demonstration 3D bundle (model/bundles/ct-nodule-seg), imported with
`secondreader model import-bundle`, is the real daemon's only model. A demo
CT with a phantom nodule goes to the daemon and to Orthanc by storescu; the
daemon delivers its SEG (a segment per lesion) and its AI SR (a TID 1411
volumetric group per lesion, referencing its segment, whose numbers point at
the lesion's box on its largest slice). OHIF, served on loopback
(tests/viewer.py), opens the study in headless Chromium:

* the SEG's colour lies where the SEG's voxels are, in millimetres: from the
  pixels OHIF renders and its own canvas-to-patient mapping, slice by slice;
  and those voxels are the phantom's nodule (Dice), so OHIF shows the nodule;
* the SR opens on the lesion's largest slice and shows the numbers of its
  group beside it, the volume the daemon measured among them ("Volume: 2.15
  ml"); the annotation OHIF draws for the group lies around the lesion's
  voxels on that slice, in millimetres (OHIF places a group only by a
  SCOORD: each NUM of ours points at the lesion's box on that slice). OHIF
  3.13.2 does not offer to track it: its measurement adapters rehydrate
  group-level regions only, which a volumetric group by segment has not;
* SR and SEG, as Orthanc holds them, pass dciodvfy, the SR PixelMed's TID
  1500 check;
* OHIF prints no console error.

Screenshots go to the test's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from daemon.config import DEFAULT_OUTPUTS
from dicom_io.sr import read_findings
from model.phantom import phantom_nodule_mask
from tests.conftest import DaemonProcess, storescu
from tests.dicom_validate import dciodvfy_errors, pixelmed_sr_errors
from tests.test_orthanc import KIND_CLASSES, by_class, delivery_config, fetch
from tests.test_review_orthanc import demo_ct
from tests.test_segmentation_bundle import import_bundle
from tests.test_viewer import WAIT_MS, _open_study, _shown, _study_count, _until
from tests.viewer import (
    ORTHANC_DICOMWEB,
    ViewerServer,
    browser,
    colour_through_volume,
    new_page,
    show_slice,
    view,
)

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_DESCRIPTION = "AI SEGMENTATION - NOT VERIFIED"
SR_DESCRIPTION = "AI RESULT - NOT VERIFIED"
SEED = 3
SPACING = (2.5, 1.4, 1.4)  # slice, row, column (mm), as demo_ct writes them
# OHIF draws a segment half transparent: its colour over grey is paler than
# the parametric map's, but any spread at all is colour on a grey CT.
SEG_SPREAD = 30




def _patient_points(header: Dataset, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    iop = np.asarray(header.ImageOrientationPatient, dtype=float)
    dy, dx = (float(v) for v in header.PixelSpacing)
    origin = np.asarray(header.ImagePositionPatient, dtype=float)
    return (
        origin
        + np.asarray(columns, dtype=float)[:, None] * dx * iop[:3]
        + np.asarray(rows, dtype=float)[:, None] * dy * iop[3:]
    )


def _seg_voxels(seg: Dataset, sources: list[Dataset]) -> np.ndarray:
    """Segment 1 of the SEG on the source grid (z, y, x), slice k on source file k."""
    read = hd.seg.Segmentation.from_dataset(seg)
    pixels = read.get_pixels_by_source_instance(
        [str(s.SOPInstanceUID) for s in sources], segment_numbers=[1],
        assert_missing_frames_are_empty=True,
        ignore_spatial_locations=True)  # fmt: skip
    return np.asarray(pixels[..., 0], dtype=bool)








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


def _sr_annotations(page: Any) -> list[list[list[float]]]:
    """The points (patient mm) of what OHIF's SR viewport draws for our groups."""
    return list(page.evaluate(
        """() => window.cornerstoneTools.annotation.state.getAllAnnotations()
              .filter(a => a.metadata.toolName === 'DICOMSRDisplay')
              .map(a => a.data.handles.points)"""
    ))  # fmt: skip


def test_the_daemons_seg_and_volume_are_where_ohif_draws_them(
    tmp_path: Path, daemon_factory, orthanc_factory
) -> None:
    orthanc = orthanc_factory(extra=ORTHANC_DICOMWEB).start()
    models = tmp_path / "models" / "ct-nodule-seg"
    done = import_bundle(models)
    assert done.returncode == 0, done.stderr
    # The default outputs: SR and its SEG, map, GSPS and summary.
    config = delivery_config(orthanc, outputs=DEFAULT_OUTPUTS)
    config += f'\n[models]\npaths = ["{models}"]\n'
    d: DaemonProcess = daemon_factory(config, env={"SECONDREADER_WORKER__DEVICE": "cpu"}).start()
    files = demo_ct(tmp_path / "ct", seed=SEED)
    sources: list[Dataset] = [dcmread(f) for f in files]  # slice k in file k
    # The modality sends to the PACS and to us; we send our results to the PACS.
    assert storescu(d.port, files).returncode == 0
    assert storescu(orthanc.dicom_port, files, aec=orthanc.aet).returncode == 0
    study_uid = str(sources[0].StudyInstanceUID)
    d.wait_for(lambda: _study_count(orthanc, study_uid) == len(files) + 5, timeout=300)
    objects = orthanc.study_instances(study_uid)
    assert {kind: len(by_class(objects, KIND_CLASSES[kind])) for kind in DEFAULT_OUTPUTS} == {
        "sr": 1, "regions": 1, "pmap": 1, "gsps": 1, "summary": 1}
    (seg_entry,), (sr_entry,) = by_class(objects, SEG_CLASS), by_class(objects, SR_CLASS)
    seg, seg_path = fetch(orthanc, seg_entry, tmp_path / "from-orthanc")
    sr, sr_path = fetch(orthanc, sr_entry, tmp_path / "from-orthanc")
    assert dciodvfy_errors(seg_path) == []
    assert dciodvfy_errors(sr_path) == []
    assert pixelmed_sr_errors(sr_path) == []
    (finding,) = [f for f in read_findings(sr) if f["present"]]
    assert finding["segmentation_sop_instance_uid"] == seg.SOPInstanceUID
    assert finding["segment_number"] == 1 and finding["volume_ml"] is not None
    mask = _seg_voxels(seg, sources)
    # The SEG holds the volume the SR states, and it is the phantom's nodule.
    assert float(mask.sum()) * float(np.prod(SPACING)) / 1000.0 == pytest.approx(
        finding["volume_ml"], abs=5e-4)
    truth = phantom_nodule_mask(SEED, n_slices=len(files), rows=256, cols=256, spacing=SPACING)
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.6
    largest = int(np.argmax(mask.sum(axis=(1, 2))))
    assert finding["referenced_sop_instance_uid"] == sources[largest].SOPInstanceUID
    volume = f"Volume: {finding['volume_ml']:.2f} ml"

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

        # -- The SR: the lesion's numbers, the volume among them, drawn at the lesion.
        page.close()
        page = new_page(page)
        _open_study(page, viewer, study_uid, first=False)
        page.get_by_text(SR_DESCRIPTION, exact=False).first.dblclick()
        pane = page.locator('[data-cy="viewport-pane"]').first
        assert _until(lambda: volume in pane.inner_text()), pane.inner_text()
        print(f"OHIF's SR viewport: {pane.inner_text()!r}")
        # What OHIF draws for the group: its annotation, in patient mm, around the
        # lesion's voxels on that slice (the box the group's numbers point at).
        (drawn,) = _until(lambda: _sr_annotations(page))
        _check_box(np.asarray(drawn[:4], dtype=float), sources[largest], mask[largest])
        page.screenshot(path=str(tmp_path / "ohif-sr.png"))
        errors = [m for m in page.console if m.startswith(("error", "pageerror"))]
        assert errors == [], errors
    assert d.stop() == 0


def _check_box(points: np.ndarray, image: Dataset, on_slice: np.ndarray) -> None:
    """The drawn box: on the largest slice's plane, around the lesion's pixels there, in mm."""
    assert points.shape == (4, 3), points
    normal = np.cross(*np.asarray(image.ImageOrientationPatient, dtype=float).reshape(2, 3))
    plane = float(np.dot(normal, image.ImagePositionPatient))
    assert np.allclose(points @ normal, plane, atol=0.01), points
    rows, columns = np.nonzero(on_slice)
    truth = _patient_points(image, rows, columns)
    half = float(SPACING[1]) / 2  # the box runs along the outer pixel edges
    assert np.allclose(points[:, :2].min(axis=0), truth[:, :2].min(axis=0) - half, atol=0.01)
    assert np.allclose(points[:, :2].max(axis=0), truth[:, :2].max(axis=0) + half, atol=0.01)
