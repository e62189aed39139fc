"""The AI finding as a Grayscale Softcopy Presentation State on its key image.

Most PACS viewers render no TID 1500 SR, but nearly all apply a GSPS: the
region is a graphic annotation on the key image, and a text annotation
carries the same sentence as the SR's label, "NOT VERIFIED" included. One
GSPS per analysed study with a present, located finding; it references the
key image of each such finding (all of one series, as GSPS requires).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Unpack

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_io.identity import NewObject, identity, station
from dicom_io.sr import algorithm_equipment
from dicom_io.wording import finding_label
from model.results import AlgorithmInfo, Finding, ImageLocation

PRESENTATION_SERIES_DESCRIPTION = "AI ANNOTATION - NOT VERIFIED"
_LAYER = "AI"
# Yellow, the usual colour of annotations (CIELab of sRGB 255, 255, 0).
_YELLOW = hd.color.CIELabColor(97.14, -21.55, 94.48)


def build_presentation_state(
    findings: Sequence[Finding],
    source_headers: Sequence[Dataset],
    algorithm: AlgorithmInfo,
    *,
    series_description: str = PRESENTATION_SERIES_DESCRIPTION,
    device_serial_number: str | None = None,
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
    **new: Unpack[NewObject],
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """A GSPS drawing each present finding's region, with its label, on its key image.

    ValueError when no finding is present with a location: there is nothing
    to draw, and a GSPS that draws nothing would only hide the images' own
    presentation.
    """
    shown = [f for f in findings if f.present and f.location is not None]
    if not shown:
        raise ValueError("no present finding with a location: nothing to annotate")
    by_uid = {h.SOPInstanceUID: h for h in source_headers}
    keys: list[Dataset] = []
    for finding in shown:
        assert finding.location is not None
        header = by_uid.get(finding.location.sop_instance_uid)
        if header is None:
            raise ValueError(f"finding {finding.label!r} points at an image not in source_headers")
        if header not in keys:
            keys.append(header)
    layer = hd.pr.GraphicLayer(
        layer_name=_LAYER, order=1, description="AI findings, not verified", display_color=_YELLOW
    )
    annotations = [_annotation(f, by_uid, layer, algorithm) for f in shown]
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=keys,
        **identity(new),
        device_serial_number=station(device_serial_number),
        content_label="AI_RESULT",
        content_description="AI result, NOT VERIFIED"[:64],
        graphic_annotations=annotations,
        graphic_layers=[layer],
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        voi_lut_transformations=_windows(keys),
        contributing_equipment=[algorithm_equipment(algorithm)],
    )
    gsps.SeriesDescription = series_description
    # General Series: Laterality is Type 2C; highdicom leaves it out.
    gsps.Laterality = keys[0].get("Laterality", "")
    return gsps


def _annotation(
    finding: Finding,
    by_uid: dict[str, Dataset],
    layer: hd.pr.GraphicLayer,
    algorithm: AlgorithmInfo,
) -> hd.pr.GraphicAnnotation:
    location = finding.location
    assert location is not None
    header = by_uid[location.sop_instance_uid]
    graphic, anchor = _graphic(location)
    text = hd.pr.TextObject(
        text_value=finding_label(finding, algorithm)[:1024],
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        anchor_point=anchor,
        anchor_point_visible=True,
    )
    return hd.pr.GraphicAnnotation(
        referenced_images=[header],
        graphic_layer=layer,
        referenced_frame_number=location.frame_number,
        graphic_objects=[graphic],
        text_objects=[text],
    )


def _graphic(location: ImageLocation) -> tuple[hd.pr.GraphicObject, tuple[float, float]]:
    """The region as a closed polyline (or its point), and where its text is anchored."""
    if location.box is not None:
        c0, r0, c1, r1 = location.box
        data = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=float)
        graphic = hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
            graphic_data=data,
            units=hd.pr.AnnotationUnitsValues.PIXEL,
        )
        return graphic, ((c0 + c1) / 2, max(r0 - 2.0, 0.0))
    graphic = hd.pr.GraphicObject(
        graphic_type=hd.pr.GraphicTypeValues.POINT,
        graphic_data=np.array([location.point], dtype=float),
        units=hd.pr.AnnotationUnitsValues.PIXEL,
    )
    return graphic, location.point


def _windows(images: list[Dataset]) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """Keep the key images' own window (a GSPS without one resets the viewer's)."""
    centre, width = images[0].get("WindowCenter"), images[0].get("WindowWidth")
    if centre is None or width is None:
        return None
    first = float(centre[0] if isinstance(centre, Sequence) and not isinstance(centre, str)
                  else centre)
    span = float(width[0] if isinstance(width, Sequence) and not isinstance(width, str) else width)
    if span <= 0:
        return None
    return [
        hd.pr.SoftcopyVOILUTTransformation(
            window_center=first,
            window_width=span,
            referenced_images=hd.ReferencedImageSequence(referenced_images=images),
        )
    ]
