"""The analysis result: the contract between the infer stage and the report stage.

Plain dataclasses, no DICOM network and no SQL, so that `model/` (which fills
them) and `dicom_io/` (which turns them into SR/SEG objects) meet here only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np


@dataclass(frozen=True)
class CodedConcept:
    """A code as the manifest names it, e.g. ("27925004", "SCT", "Nodule")."""

    value: str
    scheme_designator: str
    meaning: str


@dataclass(frozen=True)
class AlgorithmInfo:
    """Who made the result: goes to the SR's observer context and Contributing Equipment."""

    name: str
    version: str
    manufacturer: str
    device_uid: str  # changes whenever the weights change (derived from their sha256)
    parameters: dict[str, str] = field(default_factory=dict)
    # What the model is worth on a shifted test set, as (label, sentence) pairs
    # (model.evaluation): shown with the result's provenance, not written into the SR.
    evaluation: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ImageLocation:
    """Where the strongest evidence is, on one source image.

    `point` and `box` are in the image's pixel coordinates as DICOM SCOORD
    wants them: (column, row), 0-based floats, box as (col0, row0, col1, row1).
    `frame_number` is 1-based and only set for multi-frame sources.
    """

    sop_instance_uid: str
    sop_class_uid: str
    point: tuple[float, float]
    box: tuple[float, float, float, float] | None = None
    frame_number: int | None = None


@dataclass(frozen=True)
class Finding:
    """One output label of one model on one study."""

    label: str
    finding_type: CodedConcept
    finding_site: CodedConcept
    probability: float
    threshold: float
    location: ImageLocation | None
    # Projection studies (CR, DX, MG): the side the finding is on ("L", "R";
    # None where images have no laterality, as a chest radiograph), the view of
    # its key image ("PA", "CC", ...) and the views it is present on.
    laterality: str | None = None
    view: str | None = None
    views: tuple[str, ...] = ()
    # Detection models: which lesion of this label (1 = the most suspicious).
    lesion: int | None = None
    # Detection models: the box's longer side on its key image, in mm.
    # Segmentation models: the region's longest diameter in an axial plane, in mm.
    diameter_mm: float | None = None
    # Segmentation models: the region's volume, and the mean and maximum of the
    # source image over it, in modality units (HU on CT). `lesion` numbers
    # the regions of a "lesions" label, largest first.
    volume_ml: float | None = None
    mean_intensity: float | None = None
    max_intensity: float | None = None
    # 3D detection models: the box's section in its key image's plane, as a
    # closed polyline in patient coordinates (mm, LPS): the SR's SCOORD3D.
    region_3d: tuple[tuple[float, float, float], ...] | None = None

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold

    @property
    def key(self) -> str:
        """What tells one finding of a result from another: its label, its side, its lesion."""
        side = "" if self.laterality is None else f" {self.laterality}"
        lesion = "" if self.lesion is None else f" {self.lesion}"
        return f"{self.label}{side}{lesion}"


def segmented(findings: list[Finding]) -> list[tuple[int, Finding]]:
    """The findings a segmentation measured on a region, with their index in `findings`.

    In this order they are the segments of the result's SEG: segment k is
    the k-th, and holds the label map's voxels of value index + 1.
    """
    return [(i, f) for i, f in enumerate(findings) if f.volume_ml is not None]


class Outcome(StrEnum):
    ANALYSED = "analysed"
    NOT_APPLICABLE = "not_applicable"  # no model applies to the study
    FAILED_QC = "failed_qc"  # missing slices, mixed orientation, ...
    # The analysis (or encoding its result) failed for good: the not-run SR
    # says so, so that a failure never reads as "no finding".
    FAILED = "failed"


@dataclass
class SaliencyMap:
    """Probability-like map in [0, 1] on the source series' own grid.

    `frames[i]` lies on the image `source_sop_instance_uids[i]` (frame
    `source_frame_numbers[i]` when the source is multi-frame), shape (rows, cols).
    """

    series_instance_uid: str
    source_sop_instance_uids: list[str]
    frames: np.ndarray  # float32, (n, rows, cols)
    source_frame_numbers: list[int] | None = None


@dataclass
class LabelMap:
    """A segmentation on the source series' own grid: which finding each voxel belongs to.

    `frames[i]` lies on the image `source_sop_instance_uids[i]` (frame
    `source_frame_numbers[i]` of a multi-frame source), shape (rows, cols);
    a voxel holds 1 + the index of its finding in `AnalysisResult.findings`,
    0 for none. Only the images some region reaches are listed.
    """

    series_instance_uid: str
    source_sop_instance_uids: list[str]
    frames: np.ndarray  # uint16, (n, rows, cols)
    source_frame_numbers: list[int] | None = None


@dataclass
class AnalysisResult:
    study_instance_uid: str
    series_instance_uid: str | None
    outcome: Outcome
    algorithm: AlgorithmInfo | None
    findings: list[Finding] = field(default_factory=list)
    reason: str | None = None  # why the AI did not run (NOT_APPLICABLE / FAILED_QC)
    saliency: SaliencyMap | None = None
    # Segmentation models: the regions the findings were measured on.
    label_map: LabelMap | None = None
    # Each preprocessing step with its parameters, for the audit trail.
    provenance: list[dict[str, object]] = field(default_factory=list)
    # What governance watches (model/observation.py): acquisition headers,
    # intensity percentiles of the analysed volume, age band and sex. Never a
    # name, an ID or a date.
    observation: dict[str, object] = field(default_factory=dict)
