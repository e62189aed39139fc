"""Write synthetic DICOM series from numpy volumes.

Used by tests, benchmarks and `secondreader demo`: the images a modality would
send, made here because nothing can be downloaded. Not on any clinical path.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)


def write_ct_series(
    volume_hu: np.ndarray,
    out_dir: Path,
    *,
    spacing: tuple[float, float, float] = (1.0, 0.7, 0.7),  # (slice, row, column) mm
    origin: tuple[float, float, float] = (-180.0, -180.0, 0.0),
    row_direction: Sequence[float] = (1.0, 0.0, 0.0),
    column_direction: Sequence[float] = (0.0, 1.0, 0.0),
    slice_direction: Sequence[float] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "SR-TEST-0001",
    patient_name: str = "Test^Phantom",
    series_description: str = "Chest CT phantom",
    body_part: str = "CHEST",
    rescale_slopes: Sequence[float] | None = None,
    skip_slices: Sequence[int] = (),
    shuffle_instance_numbers: bool = False,
    seed: int = 0,
) -> list[Path]:
    """Write `volume_hu` (z, y, x) as one CT file per slice; returns the paths.

    Slice k lies at origin + k * spacing[0] * slice_direction. Stored values are
    (HU - intercept) / slope with intercept -1024, so a per-slice slope can be
    tested. `skip_slices` leaves gaps, as a lost instance would.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    row = np.asarray(row_direction, dtype=float)
    col = np.asarray(column_direction, dtype=float)
    normal = np.asarray(slice_direction, dtype=float) if slice_direction else np.cross(row, col)
    now = datetime.now()
    n = volume_hu.shape[0]
    instance_numbers = list(range(1, n + 1))
    if shuffle_instance_numbers:
        rng.shuffle(instance_numbers)
    paths: list[Path] = []
    for k in range(n):
        if k in skip_slices:
            continue
        slope = float(rescale_slopes[k]) if rescale_slopes is not None else 1.0
        stored = np.round((volume_hu[k].astype(np.float64) + 1024.0) / slope)
        pixels = np.clip(stored, 0, 65535).astype(np.uint16)
        position = np.asarray(origin, dtype=float) + k * spacing[0] * normal
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = "A" + study_uid[-8:].replace(".", "")
        ds.Modality = "CT"
        ds.Manufacturer = "secondreader synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic chest CT"
        ds.SeriesDescription = series_description
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = body_part
        ds.SliceThickness = f"{spacing[0]:g}"
        ds.KVP = "120"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.InstanceNumber = instance_numbers[k]
        ds.AcquisitionNumber = 1
        ds.PatientPosition = "FFS"
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{float(position @ normal):.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[2]:g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = pixels.tobytes()
        path = out_dir / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
