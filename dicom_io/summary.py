"""A Secondary Capture that any PACS shows: the AI result as a picture.

For every reported study, negative and not-run ones included:

* a positive study: the key slice, windowed, with the region drawn and a
  legend (finding, present, probability against threshold, model and
  version) under the banner "AI RESULT - NOT VERIFIED - not for diagnosis
  without physician review";
* a negative study: a plain card, "No nodule found", with the probability;
* a study the AI did not analyse: a card that says so, and why.

Burned-in text never holds patient name, ID or birth date: the header
carries those, as for every image (BurnedInAnnotation YES, and only our
own words are burned in).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import highdicom as hd
import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_io.sr import SOFTWARE_VERSION, algorithm_equipment
from dicom_io.text import printable
from dicom_io.wording import DISCLAIMER, finding_phrase, model_name, negative_headline
from model.results import AlgorithmInfo, Finding

SUMMARY_SERIES_DESCRIPTION = "AI SUMMARY - NOT VERIFIED"
WIDTH = 1024
_IMAGE_SIZE = 768  # the key slice's square
_BANNER = (176, 0, 32)  # dark red: not a finding colour, reads as a warning
_BOX = (255, 220, 0)
_TEXT = (255, 255, 255)
_MUTED = (190, 190, 190)


@cache
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    # matplotlib ships DejaVu Sans: no system font needed, same glyphs everywhere.
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def window(pixels: np.ndarray, header: Dataset) -> np.ndarray:
    """Modality values to 0..255: the image's own window, else its 1st-99th percentile."""
    centre, width = header.get("WindowCenter"), header.get("WindowWidth")
    values = np.asarray(pixels, dtype=np.float64)
    # A MONOCHROME1 image comes inverted (dicom_io.pixels): its window no longer fits.
    own = str(header.get("PhotometricInterpretation", "")) != "MONOCHROME1"
    if own and centre is not None and width is not None:
        c = float(centre[0] if _multi(centre) else centre)
        w = float(width[0] if _multi(width) else width)
    else:
        lo, hi = np.percentile(values, [1, 99])
        c, w = (lo + hi) / 2, max(hi - lo, 1e-6)
    if w <= 0:
        w = 1.0
    scaled = np.clip((values - (c - w / 2)) / w, 0.0, 1.0) * 255.0
    return scaled.astype(np.uint8)


def _multi(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def render_positive(
    pixels: np.ndarray, header: Dataset, findings: Sequence[Finding], algorithm: AlgorithmInfo
) -> np.ndarray:
    """The key slice with the regions of the present findings and the legend, RGB uint8."""
    gray = window(pixels, header)
    rows, cols = gray.shape
    scale = _IMAGE_SIZE / max(rows, cols)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    picture = Image.fromarray(gray, mode="L").resize(size, Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (WIDTH, 80 + _IMAGE_SIZE + 40 + 36 * (len(findings) + 1)), (0, 0, 0))
    left = (WIDTH - size[0]) // 2
    canvas.paste(picture.convert("RGB"), (left, 80))
    draw = ImageDraw.Draw(canvas)
    _banner(draw, DISCLAIMER)
    for number, finding in enumerate(f for f in findings if f.present and f.location):
        location = finding.location
        assert location is not None
        c0, r0, c1, r1 = location.box or (*location.point, *location.point)
        pad = 6 if location.box is None else 2
        box = (
            left + c0 * scale - pad, 80 + r0 * scale - pad,
            left + c1 * scale + pad, 80 + r1 * scale + pad,
        )  # fmt: skip
        draw.rectangle(box, outline=_BOX, width=3)
        draw.text((box[2] + 6, box[1]), str(number + 1), fill=_BOX, font=_font(24, bold=True))
    y = 80 + _IMAGE_SIZE + 16
    shown = [f for f in findings if f.present and f.location]
    for finding in findings:
        marker = f"[{shown.index(finding) + 1}] " if finding in shown else ""
        draw.text((24, y), f"{marker}{finding_phrase(finding)}", fill=_TEXT, font=_font(24))
        y += 36
    draw.text((24, y), f"Model: {model_name(algorithm)}", fill=_MUTED, font=_font(22))
    return np.asarray(canvas, dtype=np.uint8)


def render_negative(findings: Sequence[Finding], algorithm: AlgorithmInfo) -> np.ndarray:
    """The card of a study in which no finding is present."""
    lines = [(negative_headline(f), finding_phrase(f)) for f in findings]
    return _card(
        [(h, 44, True, _TEXT) for h, _ in lines[:1]]
        + [(p, 28, False, _TEXT) for _, p in lines]
        + [(f"Model: {model_name(algorithm)}", 24, False, _MUTED)]
    )


def render_not_run(reason: str, algorithm: AlgorithmInfo | None) -> np.ndarray:
    """The card of a study the AI did not analyse."""
    lines = [
        ("AI analysis NOT performed", 44, True, _TEXT),
        ("No AI result exists for this study.", 28, False, _TEXT),
        ("The absence of AI findings does not mean the study is negative.", 24, False, _TEXT),
        (f"Reason: {printable(reason, limit=160)}", 24, False, _MUTED),
    ]
    if algorithm is not None:
        lines.append((f"Model: {model_name(algorithm)}", 24, False, _MUTED))
    return _card(lines, banner="AI NOT RUN - NO AI RESULT")


def _card(
    lines: list[tuple[str, int, bool, tuple[int, int, int]]], banner: str = DISCLAIMER
) -> np.ndarray:
    canvas = Image.new("RGB", (WIDTH, 512), (16, 16, 16))
    draw = ImageDraw.Draw(canvas)
    _banner(draw, banner)
    y = 140
    for text, size, bold, colour in lines:
        for part in _wrap(text, size, bold):
            draw.text((48, y), part, fill=colour, font=_font(size, bold))
            y += int(size * 1.5)
    return np.asarray(canvas, dtype=np.uint8)


def _banner(draw: ImageDraw.ImageDraw, text: str) -> None:
    draw.rectangle((0, 0, WIDTH, 64), fill=_BANNER)
    font = _font(24, bold=True)
    width = draw.textlength(text, font=font)
    draw.text(((WIDTH - width) / 2, 18), text, fill=_TEXT, font=font)


def _wrap(text: str, size: int, bold: bool) -> list[str]:
    font, limit = _font(size, bold), WIDTH - 96
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and font.getlength(trial) > limit:
            lines.append(current)
            current = word
        else:
            current = trial
    return [*lines, current] if current else lines


def build_summary_image(
    picture: np.ndarray,
    reference: Dataset,
    *,
    algorithm: AlgorithmInfo | None,
    series_number: int,
    series_description: str = SUMMARY_SERIES_DESCRIPTION,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    manufacturer: str = "secondreader",
) -> hd.sc.SCImage:
    """The rendered `picture` (RGB uint8) as a Secondary Capture in `reference`'s study."""
    if picture.ndim != 3 or picture.shape[2] != 3 or picture.dtype != np.uint8:
        raise ValueError("the summary picture must be RGB uint8 (rows, cols, 3)")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=picture,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=manufacturer,
        patient_orientation=_orientation(reference),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        contributing_equipment=[algorithm_equipment(algorithm)] if algorithm else None,
    )
    sc.SeriesDescription = series_description
    # The modality of the images the picture comes from (General Series:
    # what "originally acquired the data used to create the images"), not
    # highdicom's OT: OHIF 3.13.2 opens its cine player over any OT or US
    # series (`autoCineModalities`), on top of the banner. Our loop guard
    # knows the image by its SOP class and UID, not by its modality.
    sc.Modality = str(reference.get("Modality") or "OT")
    sc.BurnedInAnnotation = "YES"  # our words only; no patient identifiers (module docstring)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"  # workstation: rendered here, not digitised
    sc.SoftwareVersions = SOFTWARE_VERSION
    sc.Laterality = reference.get("Laterality", "")
    return sc


_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))


def _orientation(header: Dataset) -> tuple[str, str]:
    """Patient Orientation of the rendered slice: from the source's, else its IOP."""
    given = header.get("PatientOrientation")
    if given is not None and len(given) == 2 and all(str(v) for v in given):
        return (str(given[0]), str(given[1]))
    iop = header.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return ("L", "P")  # axial, as the canonical frame lays it out
    out = []
    for vector in (iop[:3], iop[3:]):
        axis = int(np.argmax(np.abs(np.asarray(vector, dtype=float))))
        out.append(_LETTERS[axis][1 if float(vector[axis]) > 0 else 0])
    return (out[0], out[1])
