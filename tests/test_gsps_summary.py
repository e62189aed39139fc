"""The objects any PACS viewer shows: the GSPS on the key image, and the summary picture.

The summary's burned-in text is read back by tesseract, as a person reads it:
it says the finding, the probability against the threshold and NOT VERIFIED,
and never the patient's name or ID (they are in the header, as usual).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from dicom_io.pr import build_presentation_state
from dicom_io.summary import (
    build_summary_image,
    render_negative,
    render_not_run,
    render_positive,
)
from dicom_io.synthetic import write_ct_series
from dicom_io.wording import finding_label
from model.phantom import phantom_volume
from model.results import Finding, ImageLocation
from tests.dicom_validate import dciodvfy_errors
from tests.ocr import read_text
from tests.test_seg import ALGORITHM, LUNG, NODULE

# Distinctive, so that a stray copy in the picture cannot hide.
PATIENT_NAME = "Quixotic^Zebulon"
PATIENT_ID = "QZX-770431"


def _ct(folder: Path) -> tuple[list[Path], list[pydicom.Dataset]]:
    volume, _ = phantom_volume(3, n_slices=12, rows=256, cols=256, lesion=True)
    paths = write_ct_series(volume, folder, spacing=(2.5, 1.4, 1.4), seed=3)
    headers = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
        ds.save_as(path)
        headers.append(pydicom.dcmread(path, stop_before_pixels=True))
    return paths, headers


def _present(header: pydicom.Dataset) -> Finding:
    location = ImageLocation(
        header.SOPInstanceUID, header.SOPClassUID, (110.5, 90.5), (100.0, 80.0, 121.0, 101.0)
    )
    return Finding("nodule", NODULE, LUNG, 0.973, 0.95, location)


def _ocr(picture: np.ndarray, path: Path) -> str:
    Image.fromarray(picture).save(path)  # kept in the test's folder, to look at
    return read_text(path)


def test_gsps_draws_the_box_and_the_label_on_the_key_image(tmp_path: Path) -> None:
    _, headers = _ct(tmp_path / "ct")
    key = headers[6]
    finding = _present(key)
    absent = Finding("mass", NODULE, LUNG, 0.1, 0.5, None)
    gsps = build_presentation_state([finding, absent], headers, ALGORITHM, series_number=9905)
    path = tmp_path / "gsps.dcm"
    gsps.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"
    assert ds.StudyInstanceUID == key.StudyInstanceUID and ds.PatientID == PATIENT_ID
    (series,) = ds.ReferencedSeriesSequence
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedImageSequence] == [
        key.SOPInstanceUID
    ]
    (annotation,) = ds.GraphicAnnotationSequence  # the absent finding draws nothing
    (graphic,) = annotation.GraphicObjectSequence
    assert graphic.GraphicType == "POLYLINE"
    assert list(graphic.GraphicData) == [100, 80, 121, 80, 121, 101, 100, 101, 100, 80]
    (text,) = annotation.TextObjectSequence
    assert text.UnformattedTextValue == finding_label(finding, ALGORITHM)
    assert "NOT VERIFIED" in text.UnformattedTextValue
    # The key image keeps its own window: a GSPS without one would reset it.
    (voi,) = ds.SoftcopyVOILUTSequence
    assert float(voi.WindowCenter) == float(key.WindowCenter)


def test_positive_summary_shows_the_box_and_legend_and_no_patient(tmp_path: Path) -> None:
    paths, headers = _ct(tmp_path / "ct")
    key = headers[6]
    finding = _present(key)
    pixels = pydicom.dcmread(paths[6]).pixel_array.astype(np.float32) - 1024.0
    picture = render_positive(pixels, key, [finding], ALGORITHM)
    text = _ocr(picture, tmp_path / "positive.png")
    assert "NOT VERIFIED" in text and "Nodule present, 97 %" in text, text
    assert "threshold 95 %" in text and ALGORITHM.name in text, text
    for word in ("Quixotic", "Zebulon", "QZX", "770431"):
        assert word not in text
    # The box: yellow pixels around the region's place on the scaled slice.
    yellow = (picture[..., 0] > 200) & (picture[..., 1] > 180) & (picture[..., 2] < 80)
    rows, cols = np.nonzero(yellow[80 : 80 + 768])
    scale = 768 / 256
    assert abs(cols.min() - (128 + 100 * scale)) < 12 and abs(rows.min() - 80 * scale) < 12

    sc = build_summary_image(picture, key, algorithm=ALGORITHM, series_number=9906)
    path = tmp_path / "summary.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.BurnedInAnnotation == "YES"
    # The key slice's modality, not OT (over which OHIF opens its cine player).
    assert ds.Modality == key.Modality == "CT"
    assert ds.PatientID == PATIENT_ID and ds.StudyInstanceUID == key.StudyInstanceUID
    np.testing.assert_array_equal(ds.pixel_array, picture)


def test_negative_and_not_run_cards_say_so(tmp_path: Path) -> None:
    absent = Finding("nodule", NODULE, LUNG, 0.031, 0.95, None)
    text = _ocr(render_negative([absent], ALGORITHM), tmp_path / "negative.png")
    assert "No nodule found" in text and "Nodule absent, 3 % (threshold 95 %)" in text, text
    text = _ocr(render_not_run("QC: 3 slices missing", ALGORITHM), tmp_path / "not-run.png")
    # ("AI" in a sans-serif font reads as "Al" as often as not: left out.)
    assert "analysis NOT performed" in text and "3 slices missing" in text, text
    assert "does not mean the study is negative" in text, text
