"""Write synthetic DICOM series from numpy volumes.

Used by tests, benchmarks and `secondreader demo`: the images a modality would
send, made here because nothing can be downloaded. Not on any clinical path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypedDict, Unpack

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from dicom_io.codes import VIEW_CODES


@dataclass(frozen=True)
class MRSequence:
    """What an MR series says of its acquisition (MR Image Module, PS3.3 C.8.3.1)."""

    description: str  # Series Description, e.g. "T2 FLAIR AX"
    scanning_sequence: str  # "SE", "IR", "GR", ...
    sequence_variant: str  # "SK", "SP", "NONE", ...
    repetition_time: float  # ms
    echo_time: float  # ms
    inversion_time: float | None = None  # ms, for IR
    sequence_name: str = ""


T1 = MRSequence("T1 SE AX", "SE", "SP", 500.0, 12.0, sequence_name="se2d1")
T2 = MRSequence("T2 TSE AX", "SE", "SK\\SP", 4000.0, 90.0, sequence_name="tse2d1_15")
FLAIR = MRSequence("T2 FLAIR AX", "SE\\IR", "SK\\SP\\MP", 9000.0, 85.0, 2500.0,
                   sequence_name="tir2d1_15")  # fmt: skip


def write_ct_series(
    volume_hu: np.ndarray,
    out_dir: Path,
    *,
    rescale_slopes: Sequence[float] | None = None,
    **options: Unpack[SeriesOptions],
) -> list[Path]:
    """Write `volume_hu` (z, y, x) as one CT file per slice; returns the paths.

    Stored values are (HU - intercept) / slope with intercept -1024, so a
    per-slice slope can be tested. See `SeriesOptions` for the rest.
    """

    def ct(ds: Dataset, k: int) -> np.ndarray:
        slope = float(rescale_slopes[k]) if rescale_slopes is not None else 1.0
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Modality = "CT"
        ds.StudyDescription = "Synthetic chest CT"
        ds.KVP = "120"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        stored = np.round((volume_hu[k].astype(np.float64) + 1024.0) / slope)
        return np.clip(stored, 0, 65535).astype(np.uint16)

    options.setdefault("series_description", "Chest CT phantom")
    return _write_series(volume_hu.shape[0], out_dir, ct, "CT", **options)


def write_mr_series(
    volume: np.ndarray, out_dir: Path, sequence: MRSequence, **options: Unpack[SeriesOptions]
) -> list[Path]:
    """Write `volume` (z, y, x, signal >= 0) as one MR image per slice of `sequence`."""

    def mr(ds: Dataset, k: int) -> np.ndarray:
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.Modality = "MR"
        ds.StudyDescription = "Synthetic brain MR"
        ds.ScanningSequence = sequence.scanning_sequence
        ds.SequenceVariant = sequence.sequence_variant
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = sequence.sequence_name
        ds.RepetitionTime = f"{sequence.repetition_time:g}"
        ds.EchoTime = f"{sequence.echo_time:g}"
        if sequence.inversion_time is not None:
            ds.InversionTime = f"{sequence.inversion_time:g}"
        ds.EchoTrainLength = "1"
        ds.MagneticFieldStrength = "3"
        ds.ImagedNucleus = "1H"
        return np.clip(np.round(volume[k]), 0, 65535).astype(np.uint16)

    options.setdefault("series_description", sequence.description)
    options.setdefault("body_part", "BRAIN")
    return _write_series(volume.shape[0], out_dir, mr, "MR", **options)


class SeriesOptions(TypedDict, total=False):
    """Geometry and identity of a synthetic series.

    Slice k lies at origin + k * spacing[0] * slice_direction. `skip_slices`
    leaves gaps, as a lost instance would. Series of one study share a frame
    of reference only when given the same `frame_of_reference_uid`.
    """

    spacing: tuple[float, float, float]  # (slice, row, column) mm; default (1.0, 0.7, 0.7)
    origin: tuple[float, float, float]
    row_direction: Sequence[float]
    column_direction: Sequence[float]
    slice_direction: Sequence[float] | None
    study_uid: str | None
    series_uid: str | None
    frame_of_reference_uid: str | None
    series_number: int
    patient_id: str
    patient_name: str
    series_description: str
    body_part: str
    skip_slices: Sequence[int]
    shuffle_instance_numbers: bool
    seed: int


def _write_series(
    n: int,
    out_dir: Path,
    modality_module: Callable[[Dataset, int], np.ndarray],
    prefix: str,
    *,
    spacing: tuple[float, float, float] = (1.0, 0.7, 0.7),
    origin: tuple[float, float, float] = (-180.0, -180.0, 0.0),
    row_direction: Sequence[float] = (1.0, 0.0, 0.0),
    column_direction: Sequence[float] = (0.0, 1.0, 0.0),
    slice_direction: Sequence[float] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 2,
    patient_id: str = "SR-TEST-0001",
    patient_name: str = "Test^Phantom",
    series_description: str = "",
    body_part: str = "CHEST",
    skip_slices: Sequence[int] = (),
    shuffle_instance_numbers: bool = False,
    seed: int = 0,
) -> list[Path]:
    """The files of one series: the common modules here, the modality's from `modality_module`
    (which sets its attributes on the slice's dataset and returns its stored pixels)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    row = np.asarray(row_direction, dtype=float)
    col = np.asarray(column_direction, dtype=float)
    normal = np.asarray(slice_direction, dtype=float) if slice_direction else np.cross(row, col)
    now = datetime.now()
    instance_numbers = list(range(1, n + 1))
    if shuffle_instance_numbers:
        rng.shuffle(instance_numbers)
    paths: list[Path] = []
    for k in range(n):
        if k in skip_slices:
            continue
        position = np.asarray(origin, dtype=float) + k * spacing[0] * normal
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = "A" + study_uid[-8:].replace(".", "")
        ds.Manufacturer = "secondreader synthetic"
        ds.ReferringPhysicianName = ""
        ds.SeriesDescription = series_description
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = body_part
        ds.SliceThickness = f"{spacing[0]:g}"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = instance_numbers[k]
        ds.AcquisitionNumber = 1
        ds.PatientPosition = "FFS" if body_part != "BRAIN" else "HFS"
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{float(position @ normal):.4f}"
        pixels = modality_module(ds, k)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[2]:g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
        path = out_dir / f"{prefix}{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_projection(
    image: np.ndarray,
    path: Path,
    *,
    modality: str = "CR",
    view: str = "PA",
    laterality: str | None = None,
    spacing: tuple[float, float] = (0.2, 0.2),
    study_uid: str,
    series_uid: str,
    instance_number: int = 1,
    patient_id: str = "SR-TEST-0001",
    patient_name: str = "Test^Phantom",
) -> Path:
    """One projection radiograph (CR, DX or MG "for presentation"), MONOCHROME2, 16 bit.

    MG images carry what the mammography IOD asks of a view: Image Laterality,
    View Position and the View Code Sequence, the breast as anatomic region.
    """
    from pydicom.uid import UID

    classes = {"CR": UID("1.2.840.10008.5.1.4.1.1.1"), "DX": UID("1.2.840.10008.5.1.4.1.1.1.1"),
               "MG": UID("1.2.840.10008.5.1.4.1.1.1.2")}  # fmt: skip
    now = datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = classes[modality]
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = "A" + study_uid[-8:].replace(".", "")
    ds.Modality = modality
    ds.Manufacturer = "secondreader synthetic"
    ds.ReferringPhysicianName = ""
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F" if modality == "MG" else "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, instance_number
    ds.PatientOrientation = ""
    ds.BodyPartExamined = "BREAST" if modality == "MG" else "CHEST"
    ds.ViewPosition = view
    if modality in ("DX", "MG"):
        _digital_xray(ds, modality, view, laterality)
    pixels = np.clip(np.round(image), 0, 65535).astype(np.uint16)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = ds.ImagerPixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
    ds.WindowCenter = f"{float(pixels.mean()):.0f}"
    ds.WindowWidth = f"{max(1, int(np.ptp(pixels))):d}"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# Patient Orientation (0020,0020) of each view as a mammography unit displays it.
_MG_ORIENTATION = {("R", "CC"): ["P", "L"], ("L", "CC"): ["A", "R"],
                   ("R", "MLO"): ["P", "F"], ("L", "MLO"): ["A", "F"]}


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _digital_xray(ds: Dataset, modality: str, view: str, laterality: str | None) -> None:
    """The DX Series, DX Anatomy Imaged, DX Image, DX Detector and DX Positioning modules,
    and for MG the Mammography Series and Image modules (PS3.3 C.8.11, C.8.11.7)."""
    mammography = modality == "MG"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = laterality or "U"
    region = ("76752008", "SCT", "Breast") if mammography else ("51185008", "SCT", "Thorax")
    ds.AnatomicRegionSequence = [_code(*region)]
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.PatientOrientation = _MG_ORIENTATION.get((laterality or "", view), ["L", "F"])
    ds.DetectorType = "DIRECT"
    ds.PositionerType = "MAMMOGRAPHIC" if mammography else ""
    ds.AcquisitionContextSequence = []
    code = VIEW_CODES.get(view)
    if code is not None:
        item = _code(code[0], "SCT", code[1])
        item.ViewModifierCodeSequence = []
        ds.ViewCodeSequence = [item]
    if mammography:
        ds.OrganExposed = "BREAST"
        ds.BreastImplantPresent = "NO"
        ds.PartialView = "NO"
