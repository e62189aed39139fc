"""Load the images of one series into a SimpleITK volume with its DICOM geometry, and check it.

The volume keeps the source grid: slice k of `LoadedSeries.image` is the image
`sop_instance_uids[k]`, and its direction matrix has the columns row direction,
column direction and slice normal, so a voxel index maps back to a SOP
instance and a (column, row) pixel without any reorientation bookkeeping.

Slices are ordered by their position along the slice normal, never by
InstanceNumber (modalities number in acquisition order, and some renumber).
Pixel data is decoded by pydicom (pylibjpeg for JPEG, JPEG-LS and JPEG 2000;
no GDCM needed) and the modality rescale is applied per slice and per frame
in float32: slices of one series may carry different slopes.

A series that would give the network a distorted volume (a missing or
unevenly spaced slice, two orientations, two image sizes) raises
`SeriesQCError`, whose reason is written for the radiologist who reads it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

log = logging.getLogger(__name__)

# Projection radiography: one 2D image per instance, no patient-space geometry.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "RG"})
NON_IMAGE_MODALITIES = frozenset({"SR", "SEG", "PR", "KO", "REG", "RTSTRUCT", "RTPLAN", "DOC"})

# Direction cosines written as DS differ in the 5th-6th decimal between slices
# of one acquisition; a real second orientation differs by far more.
ORIENTATION_TOLERANCE = 1e-3
# A gap more than 10 % off the median spacing is a missing or misplaced slice.
SPACING_TOLERANCE = 0.10
# Closer than this (mm) along the normal, two slices are at the same position.
DUPLICATE_TOLERANCE_MM = 0.01

_HEADER_TAGS = [
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "Modality",
    "BodyPartExamined",
    "SeriesDescription",
    "NumberOfFrames",
    "Rows",
]


class SeriesQCError(Exception):
    """The series cannot be analysed safely; `reason` says why, in a radiologist's words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class LoadedSeries:
    """One series as a float32 volume on its own grid, with what the report stage needs.

    `image` is 3D, (columns, rows, slices) in SimpleITK index order, values in
    modality units (HU for CT). Projection images are a one-slice volume with
    unit direction and origin 0; MONOCHROME1 images are inverted so that a
    higher value is always brighter on a standard display (denser on X-ray).
    `headers` are the files' headers without pixel data, one per file, in
    slice order.
    """

    image: sitk.Image
    sop_instance_uids: list[str]
    frame_numbers: list[int] | None
    sop_class_uid: str
    modality: str
    body_part: str | None
    series_description: str | None
    study_instance_uid: str
    series_instance_uid: str
    is_projection: bool
    headers: list[Dataset]
    warnings: list[str] = field(default_factory=list)

    @property
    def n_slices(self) -> int:
        return len(self.sop_instance_uids)


@dataclass(frozen=True)
class SeriesFiles:
    """The files of one series in a study, known from their headers only."""

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    body_part: str | None
    series_description: str | None
    series_number: int | None
    paths: tuple[Path, ...]
    n_slices: int  # images, counting each frame of a multi-frame image


@dataclass
class _Frame:
    """One 2D image of the series: a single-frame file or one frame of a multi-frame file."""

    file_index: int
    frame_number: int | None  # 1-based; None for a single-frame file
    sop_instance_uid: str
    position: np.ndarray | None  # ImagePositionPatient, mm
    orientation: np.ndarray | None  # ImageOrientationPatient, 6 direction cosines
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns), mm
    slope: float
    intercept: float
    rows: int
    columns: int


def _mm(value: float) -> str:
    """A length for a message: "3", "0.625", "1.25" rather than "3.000000"."""
    return f"{value:.3f}".rstrip("0").rstrip(".") or "0"


def _floats(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return arr


def _spacing_pair(value: object) -> tuple[float, float] | None:
    """(row, column) spacing if both are positive: some CRs write 0\\0 for "unknown"."""
    arr = _floats(value)
    if arr is None or arr.size != 2 or not np.all(arr > 0):
        return None
    return float(arr[0]), float(arr[1])


def _item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _functional_group(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    """The first item of a functional group macro for frame `index`: per-frame wins over shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        found = _item(per_frame[index], keyword)
        if found is not None:
            return found
    shared = ds.get("SharedFunctionalGroupsSequence")
    return _item(shared[0], keyword) if shared else None


def _is_enhanced(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _frames_of(ds: Dataset, file_index: int) -> list[_Frame]:
    uid = str(ds.SOPInstanceUID)
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not _is_enhanced(ds):
        if n_frames > 1:
            raise SeriesQCError(
                f"image {uid} holds {n_frames} frames without a position for each: "
                "the slice order and spacing cannot be checked"
            )
        return [
            _Frame(
                file_index,
                None,
                uid,
                _floats(ds.get("ImagePositionPatient")),
                _floats(ds.get("ImageOrientationPatient")),
                _spacing_pair(ds.get("PixelSpacing")),
                float(ds.get("RescaleSlope", 1.0) or 1.0),
                float(ds.get("RescaleIntercept", 0.0) or 0.0),
                rows,
                columns,
            )
        ]
    frames: list[_Frame] = []
    for i in range(n_frames):
        position = _functional_group(ds, i, "PlanePositionSequence")
        orientation = _functional_group(ds, i, "PlaneOrientationSequence")
        measures = _functional_group(ds, i, "PixelMeasuresSequence")
        rescale = _functional_group(ds, i, "PixelValueTransformationSequence")
        frames.append(
            _Frame(
                file_index,
                i + 1,
                uid,
                _floats(position.get("ImagePositionPatient")) if position else None,
                _floats(orientation.get("ImageOrientationPatient")) if orientation else None,
                _spacing_pair(measures.get("PixelSpacing")) if measures else None,
                float(rescale.get("RescaleSlope", 1.0) or 1.0) if rescale else 1.0,
                float(rescale.get("RescaleIntercept", 0.0) or 0.0) if rescale else 0.0,
                rows,
                columns,
            )
        )
    return frames


def _single_slice_spacing(ds: Dataset) -> float | None:
    """Through-plane spacing of a one-slice volume, from the header if it states one."""
    candidates = [ds.get("SpacingBetweenSlices"), ds.get("SliceThickness")]
    measures = _functional_group(ds, 0, "PixelMeasuresSequence") if _is_enhanced(ds) else None
    if measures is not None:
        candidates = [measures.get("SpacingBetweenSlices"), measures.get("SliceThickness")]
    for value in candidates:
        try:
            if value is not None and float(value) > 0:
                return float(value)
        except (TypeError, ValueError):
            continue
    return None


def _check_same(frames: Sequence[_Frame]) -> None:
    sizes = sorted({(f.rows, f.columns) for f in frames})
    if len(sizes) > 1:
        listed = " and ".join(f"{r}x{c}" for r, c in sizes[:3])
        raise SeriesQCError(f"the series mixes image sizes ({listed} pixels)")
    if sizes[0][0] == 0 or sizes[0][1] == 0:
        raise SeriesQCError("the images state no size (Rows/Columns): no pixel data to analyse")


def _check_geometry(frames: Sequence[_Frame]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared (row direction, column direction, in-plane spacing); refuses mixed geometry."""
    for f in frames:
        if f.position is None or f.position.size != 3:
            raise SeriesQCError(
                f"image {f.sop_instance_uid} has no Image Position (Patient): "
                "the slice order cannot be established"
            )
        if f.orientation is None or f.orientation.size != 6:
            raise SeriesQCError(
                f"image {f.sop_instance_uid} has no Image Orientation (Patient): "
                "the slice geometry cannot be established"
            )
    reference = frames[0].orientation
    assert reference is not None
    for f in frames[1:]:
        assert f.orientation is not None
        if np.max(np.abs(f.orientation - reference)) > ORIENTATION_TOLERANCE:
            raise SeriesQCError(
                "the series mixes image orientations (e.g. axial and another plane, or a "
                f"tilted localiser): {_cosines(reference)} and {_cosines(f.orientation)}"
            )
    spacings = {f.pixel_spacing for f in frames}
    if None in spacings:
        raise SeriesQCError("an image of the series states no Pixel Spacing")
    values = np.asarray([s for s in spacings if s is not None], dtype=float)
    if np.max(np.abs(values - values[0])) > 1e-3 * float(values[0].max()):
        raise SeriesQCError(
            f"the series mixes pixel spacings ({_mm(values[0][0])} and {_mm(values[-1][0])} mm)"
        )
    row_dir = reference[:3] / np.linalg.norm(reference[:3])
    col_dir = reference[3:] / np.linalg.norm(reference[3:])
    spacing = values[0]
    return row_dir, col_dir, spacing


def _cosines(orientation: np.ndarray) -> str:
    return "\\".join(f"{v:.3f}" for v in orientation)


def _check_spacing(locations: np.ndarray) -> float:
    """The slice spacing of sorted `locations` (mm along the normal); refuses gaps and doubles."""
    gaps = np.diff(locations)
    for i, gap in enumerate(gaps):
        if gap < DUPLICATE_TOLERANCE_MM:
            raise SeriesQCError(
                f"two images lie at the same slice location {_mm(locations[i])} mm "
                "(repeated acquisition or several phases in one series)"
            )
    expected = float(np.median(gaps))
    problems: list[str] = []
    for i, gap in enumerate(gaps):
        if abs(gap - expected) <= SPACING_TOLERANCE * expected:
            continue
        where = (
            f"between slice locations {_mm(locations[i])} mm and {_mm(locations[i + 1])} mm "
            f"where {_mm(expected)} mm is expected"
        )
        ratio = gap / expected
        missing = round(ratio) - 1
        if missing >= 1 and abs(ratio - round(ratio)) <= SPACING_TOLERANCE:
            plural = "s" if missing > 1 else ""
            problems.append(f"slice gap of {_mm(gap)} mm {where}: {missing} slice{plural} missing")
        else:
            problems.append(f"uneven slice spacing: {_mm(gap)} mm {where}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SeriesQCError(problems[0] + more)
    return expected


@dataclass(frozen=True)
class _File:
    path: Path
    # Where the header ends: the Pixel Data element, read from there alone
    # (`_decode`) instead of parsing the whole header a second time.
    pixel_offset: int
    # Stored values already decoded (`read_image_file`, read while the study
    # was still arriving): `_decode` returns them instead of reading again.
    stored: np.ndarray | None = None


@dataclass(frozen=True)
class ImageFile:
    """One file of a series read ahead of the rest: its header and its stored pixel values.

    `stored` is (frames, rows, cols), a private copy; `frames` the geometry
    and rescale of each frame. `load_series(..., read_ahead=...)` takes
    these instead of reading the files again.
    """

    path: Path
    header: Dataset
    pixel_offset: int
    stored: np.ndarray
    frames: tuple[_Frame, ...]

    @property
    def nbytes(self) -> int:
        return int(self.stored.nbytes)

    def modality_values(self, index: int) -> np.ndarray:
        """Frame `index` (0-based) in modality units, as `load_series` computes it."""
        return _rescaled(self.stored[index], self.frames[index])


def read_image_file(path: Path | str) -> ImageFile:
    """Read one image file (header and pixels) on its own; SeriesQCError when unfit."""
    headers, files = _read_headers([Path(path)])
    header, file = headers[0], files[0]
    _check_series(headers)
    stored = np.array(_decode(file, header), copy=True)  # `_decode` may return scratch memory
    return ImageFile(file.path, header, file.pixel_offset, stored, tuple(_frames_of(header, 0)))


def _read_headers(
    paths: Sequence[Path], read_ahead: Mapping[Path, ImageFile] | None = None
) -> tuple[list[Dataset], list[_File]]:
    headers: list[Dataset] = []
    files: list[_File] = []
    for path in paths:
        known = read_ahead.get(path) if read_ahead else None
        if known is not None:
            headers.append(known.header)
            files.append(_File(known.path, known.pixel_offset, known.stored))
            continue
        try:
            with open(path, "rb") as fh:
                headers.append(pydicom.dcmread(fh, stop_before_pixels=True))
                files.append(_File(Path(path), fh.tell()))
        except (InvalidDicomError, OSError) as exc:
            raise SeriesQCError(f"file {Path(path).name} is not a readable DICOM file") from exc
    return headers, files


def _deduplicate(
    headers: list[Dataset], files: list[_File]
) -> tuple[list[Dataset], list[_File], int]:
    """Drop repeated SOP instances (a modality or PACS may send an instance twice)."""
    seen: set[str] = set()
    keep_h: list[Dataset] = []
    keep_f: list[_File] = []
    for ds, file in zip(headers, files, strict=True):
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid in seen:
            continue
        seen.add(uid)
        keep_h.append(ds)
        keep_f.append(file)
    return keep_h, keep_f, len(headers) - len(keep_h)


# Uncompressed little endian: the pixel values are the element's bytes.
_NATIVE = {"1.2.840.10008.1.2": True, "1.2.840.10008.1.2.1": False}  # uid -> implicit VR


_SCRATCH = threading.local()


def _scratch(dtype: np.dtype, count: int) -> np.ndarray:
    """A buffer for one file's pixels, reused by this thread from file to file.

    A fresh 512 KB array per slice is a fresh mmap each time (glibc's
    threshold), and its page faults cost more than reading the file: about
    a second for a 300-slice CT in a worker thread's first study.
    """
    nbytes = count * dtype.itemsize
    buf: np.ndarray | None = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(nbytes, dtype=np.uint8)
        _SCRATCH.buf = buf
    return buf[:nbytes].view(dtype)


def _native(file: _File, header: Dataset) -> np.ndarray | None:
    """The stored values of an uncompressed file read straight from its Pixel Data.

    pydicom's pixel_array costs a second parse of the header and its decoder
    machinery: a third of loading a 300-slice CT. None when the file is not
    plain 8- or 16-bit greyscale with a defined length; `_decode` then asks pydicom.
    The array is this thread's scratch buffer: valid until the next call.
    """
    meta = getattr(header, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    implicit = _NATIVE.get(syntax)
    allocated = int(header.get("BitsAllocated", 0) or 0)
    stored_bits = int(header.get("BitsStored", allocated) or allocated)
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    if implicit is None or allocated not in (8, 16) or samples != 1:
        return None
    rows, cols = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    with open(file.path, "rb") as fh:
        fh.seek(file.pixel_offset)
        head = fh.read(8 if implicit else 12)
        if len(head) < 8 or head[:4] != b"\xe0\x7f\x10\x00":
            return None
        if implicit:
            length = int.from_bytes(head[4:8], "little")
        elif head[4:6] in (b"OW", b"OB"):
            length = int.from_bytes(head[8:12], "little")
        else:
            return None
        count = rows * cols * frames
        if length == 0xFFFFFFFF or length < count * allocated // 8:
            return None
        signed = int(header.get("PixelRepresentation", 0) or 0) == 1
        dtype = np.dtype(f"{'<i' if signed else '<u'}{allocated // 8}")
        arr = _scratch(dtype, count)
        if fh.readinto(arr.data.cast("B")) != arr.nbytes:
            return None
    if stored_bits < allocated:
        # The unused high bits may hold anything (PS3.5 8.1.1): shift them
        # out and back, sign-extending, as pydicom does.
        shift = allocated - stored_bits
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)
    return arr.reshape(frames, rows, cols)


def _decode(file: _File, header: Dataset) -> np.ndarray:
    """Stored pixel values of one file as (frames, rows, cols)."""
    if file.stored is not None:
        return file.stored
    uid = str(header.SOPInstanceUID)
    try:
        native = _native(file, header)
    except OSError as exc:
        raise SeriesQCError(f"image {uid} cannot be read") from exc
    if native is not None:
        return native
    ds = pydicom.dcmread(file.path)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise SeriesQCError(f"image {uid} has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # any decoder failure means the same to the reader
        syntax = ds.file_meta.get("TransferSyntaxUID")
        name = getattr(syntax, "name", str(syntax))
        log.error("cannot decode pixel data of %s (%s): %s", uid, name, exc)
        raise SeriesQCError(f"the pixel data of image {uid} ({name}) cannot be decoded") from exc
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    return arr.reshape(n_frames, arr.shape[-2], arr.shape[-1])


def _stored_range(ds: Dataset) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _check_series(headers: Sequence[Dataset]) -> None:
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in headers}
    if len(series) > 1:
        raise ValueError(f"files of {len(series)} series given; load one series at a time")
    for ds in headers:
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise SeriesQCError(
                f"image {ds.SOPInstanceUID} is a colour image "
                f"({ds.get('PhotometricInterpretation', '?')}); only greyscale is analysed"
            )
    classes = {str(ds.get("SOPClassUID", "")) for ds in headers}
    if len(classes) > 1:
        raise SeriesQCError("the series mixes different kinds of image (SOP classes)")


def load_series(
    paths: Sequence[Path | str], read_ahead: Mapping[Path, ImageFile] | None = None
) -> LoadedSeries:
    """Read, sort and check the files of one series; raises SeriesQCError when unfit.

    ValueError if the files belong to several series (the caller groups them:
    see `choose_series`). A file found in `read_ahead` is not read again.
    """
    if not paths:
        raise SeriesQCError("the series has no images")
    path_list = [Path(p) for p in paths]
    headers, files, n_duplicates = _deduplicate(*_read_headers(path_list, read_ahead))
    warnings: list[str] = []
    if n_duplicates:
        warnings.append(f"{n_duplicates} repeated instance(s) ignored")
    _check_series(headers)
    first = headers[0]
    modality = str(first.get("Modality", "") or "").upper()
    frames = [f for i, ds in enumerate(headers) for f in _frames_of(ds, i)]
    _check_same(frames)

    geometry_missing = frames[0].position is None or frames[0].orientation is None
    is_projection = len(frames) == 1 and (modality in PROJECTION_MODALITIES or geometry_missing)
    if not is_projection and modality in PROJECTION_MODALITIES:
        raise SeriesQCError(
            f"the {modality} series holds {len(frames)} images; each projection image "
            "is analysed on its own"
        )

    if is_projection:
        image, order = _projection(frames[0], headers[0], files[0], warnings)
    else:
        image, order = _volume(frames, headers, files, warnings)
        if any(str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1" for ds in headers):
            warnings.append("MONOCHROME1 cross-sectional images: values kept as rescaled")

    file_order: list[int] = []
    for f in order:
        if f.file_index not in file_order:
            file_order.append(f.file_index)
    multi_frame = any(f.frame_number is not None for f in order)
    series = LoadedSeries(
        image=image,
        sop_instance_uids=[f.sop_instance_uid for f in order],
        frame_numbers=[int(f.frame_number or 1) for f in order] if multi_frame else None,
        sop_class_uid=str(first.get("SOPClassUID", "")),
        modality=modality,
        body_part=(str(first.get("BodyPartExamined", "")).strip() or None),
        series_description=(str(first.get("SeriesDescription", "")).strip() or None),
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=str(first.get("SeriesInstanceUID", "")),
        is_projection=is_projection,
        headers=[headers[i] for i in file_order],
        warnings=warnings,
    )
    for w in warnings:
        log.warning("series %s: %s", series.series_instance_uid, w)
    log.info(
        "loaded series %s: %s, %d slice(s) of %dx%d",
        series.series_instance_uid,
        modality or "?",
        series.n_slices,
        frames[0].rows,
        frames[0].columns,
    )
    return series


def _modality_values(stored: np.ndarray, header: Dataset, frame: _Frame) -> np.ndarray:
    """Stored values in modality units, float32."""
    if "ModalityLUTSequence" in header:
        # Some DX/MG state a lookup table instead of slope and intercept.
        return np.asarray(apply_modality_lut(stored, header), dtype=np.float32)
    return stored.astype(np.float32) * np.float32(frame.slope) + np.float32(frame.intercept)


def _projection(
    frame: _Frame, header: Dataset, file: _File, warnings: list[str]
) -> tuple[sitk.Image, list[_Frame]]:
    """A 2D image as a one-slice volume; spacing from Pixel Spacing or Imager Pixel Spacing."""
    stored = _decode(file, header)[0]
    arr = _modality_values(stored, header, frame)
    if str(header.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        # MONOCHROME1 displays low values bright. Mirroring within the range the
        # stored values can take keeps values in the source's range, so the
        # network sees bone bright on every CR/DX whatever the vendor wrote.
        ends = _modality_values(
            np.asarray(_stored_range(header), dtype=stored.dtype), header, frame
        )
        arr = np.float32(float(ends.min()) + float(ends.max())) - arr
        warnings.append("MONOCHROME1 image inverted so that higher values are brighter")
    spacing = (
        frame.pixel_spacing
        or _spacing_pair(header.get("PixelSpacing"))
        or _spacing_pair(header.get("ImagerPixelSpacing"))
    )
    if spacing is None:
        warnings.append("no pixel spacing stated: 1 mm pixels assumed")
        spacing = (1.0, 1.0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr[None]))
    image.SetSpacing((spacing[1], spacing[0], 1.0))
    return image, [frame]


def _volume(
    frames: list[_Frame], headers: Sequence[Dataset], files: Sequence[_File], warnings: list[str]
) -> tuple[sitk.Image, list[_Frame]]:
    """A cross-sectional stack, sorted along the slice normal and checked for gaps."""
    row_dir, col_dir, in_plane = _check_geometry(frames)
    normal = np.cross(row_dir, col_dir)
    locations = np.asarray([float(f.position @ normal) for f in frames])
    order_idx = np.argsort(locations, kind="stable")
    ordered = [frames[i] for i in order_idx]
    sorted_locations = locations[order_idx]
    if len(ordered) > 1:
        slice_spacing = _check_spacing(sorted_locations)
        _warn_shear(ordered, row_dir, col_dir, in_plane, warnings)
    else:
        slice_spacing = _single_slice_spacing(headers[0]) or 1.0

    rows, columns = ordered[0].rows, ordered[0].columns
    volume = np.empty((len(ordered), rows, columns), dtype=np.float32)
    slot = {(f.file_index, f.frame_number or 1): k for k, f in enumerate(ordered)}
    frame_of = {(f.file_index, f.frame_number or 1): f for f in frames}
    for file_index, file in enumerate(files):
        stored = _decode(file, headers[file_index])
        for j in range(stored.shape[0]):
            key = (file_index, j + 1)
            _rescaled(stored[j], frame_of[key], out=volume[slot[key]])
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((in_plane[1], in_plane[0], slice_spacing))
    image.SetOrigin(tuple(float(v) for v in ordered[0].position))
    # Direction columns: index i (column) runs along the row direction, j along
    # the column direction, k along the normal, as the slices were sorted.
    direction = np.column_stack([row_dir, col_dir, normal])
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image, ordered


def _rescaled(stored: np.ndarray, frame: _Frame, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values times slope plus intercept, in float32.

    In place into `out` (no temporary array per slice, see `_scratch`). One
    function for the volume and for slices read ahead (`ImageFile`), so
    both give the network the very same values.
    """
    if out is None:
        out = np.empty(stored.shape, dtype=np.float32)
    np.multiply(stored, np.float32(frame.slope), out=out, casting="unsafe")
    out += np.float32(frame.intercept)
    return out


def _warn_shear(
    ordered: Sequence[_Frame],
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    in_plane: np.ndarray,
    warnings: list[str],
) -> None:
    """Gantry tilt shifts each slice in-plane; the volume is then sheared, not rectilinear."""
    first = ordered[0].position
    assert first is not None
    shifts = [
        max(abs(float((f.position - first) @ row_dir)), abs(float((f.position - first) @ col_dir)))
        for f in ordered
        if f.position is not None
    ]
    worst = max(shifts)
    if worst > 0.5 * float(in_plane.min()):
        warnings.append(
            f"slice positions shift in-plane by up to {_mm(worst)} mm (gantry tilt?): "
            "positions in patient space may be off by as much"
        )


def choose_series(
    study_files: Iterable[Path | str], headers: Mapping[Path, Dataset] | None = None
) -> list[SeriesFiles]:
    """Group a study's files into image series, reading a few header attributes only.

    Non-image objects (SR, SEG, PR, KO ...) and unreadable files are left out.
    A projection series (CR, DX, MG ...) gives one entry per image, since each
    view is analysed on its own. Sorted by series number, then UID. A file
    whose header is in `headers` (read ahead) is not read again.
    """
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for raw in study_files:
        path = Path(raw)
        known = headers.get(path) if headers else None
        try:
            ds = known or pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=_HEADER_TAGS
            )
        except (InvalidDicomError, OSError) as exc:
            log.warning("skipping %s: not a readable DICOM file (%s)", path.name, exc)
            continue
        modality = str(ds.get("Modality", "") or "").upper()
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid or modality in NON_IMAGE_MODALITIES or "Rows" not in ds:
            continue
        groups.setdefault(uid, []).append((path, ds))

    out: list[SeriesFiles] = []
    for uid, members in groups.items():
        first = members[0][1]
        modality = str(first.get("Modality", "") or "").upper()
        chunks = [[m] for m in members] if modality in PROJECTION_MODALITIES else [members]
        for chunk in chunks:
            number = first.get("SeriesNumber")
            out.append(
                SeriesFiles(
                    series_instance_uid=uid,
                    study_instance_uid=str(first.get("StudyInstanceUID", "")),
                    modality=modality,
                    body_part=(str(first.get("BodyPartExamined", "")).strip() or None),
                    series_description=(str(first.get("SeriesDescription", "")).strip() or None),
                    series_number=int(number) if number not in (None, "") else None,
                    paths=tuple(sorted(p for p, _ in chunk)),
                    n_slices=sum(int(ds.get("NumberOfFrames", 1) or 1) for _, ds in chunk),
                )
            )
    out.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_instance_uid))
    return out
