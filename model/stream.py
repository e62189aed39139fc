"""Analysis begun while a study is still arriving: each image read, prepared and run
through the 2D models it fits as soon as it is in the spool.

The worker's streamer (daemon/stages/analyse/stream.py) hands each new file
to `ReadAhead.add`. At completion the analysis (`model.analysis`) takes what
is there (`ReadAhead.take`) and does only the rest: the last few images, the
saliency and the region.

Nothing here is a result. It is a memo of per-image work, made by the same
functions the analysis would call (`read_image_file`, `prepare_slices`, the
model's `probabilities`), so a study analysed from it gets the findings it
would get from its files (tests/test_streaming.py). An entry is used only
while its file is the one it was read from (device, inode, size and
modification time): an instance re-sent and replaced is read again. The
memo lives in the worker's memory only: a crash loses it, and the job then
reads the files, as it always could.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from pydicom.dataset import Dataset

from dicom_io.series import ImageFile, SeriesQCError, read_image_file
from model.manifest import ModelManifest
from model.slicewise import SlicePlan, plan_for, prepare_slices

log = logging.getLogger(__name__)

FileKey = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns

# Analysed studies remembered as closed to the streamer: enough for the
# rows it may still hold of them.
_CLOSED_KEPT = 1000
# Plane geometries remembered (one per series geometry seen, as a rule).
_PLANS_KEPT = 1000


class Applicable(Protocol):
    """A model with its manifest, that says whether it applies to a series."""

    @property
    def manifest(self) -> ModelManifest: ...

    def applicability(
        self,
        modality: str | None,
        body_part: str | None = None,
        series_description: str | None = None,
        n_slices: int = 1,
    ) -> str | None: ...


class SliceModel(Applicable, Protocol):
    """A model whose per-slice probabilities can be computed apart from its saliency."""

    def probabilities(self, slices: np.ndarray) -> np.ndarray: ...


def model_key(manifest: ModelManifest) -> str:
    """Name and version: the registry refuses the same pair twice."""
    return f"{manifest.name} {manifest.version}"


def file_key(path: Path) -> FileKey | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class PreparedSlices:
    """One model's network input and probabilities for the frames of one file."""

    plan: SlicePlan
    x: np.ndarray  # (frames, rows, cols) float32
    probabilities: np.ndarray  # (frames, labels) float32


@dataclass
class _Entry:
    key: FileKey
    study_instance_uid: str
    image: ImageFile
    models: dict[str, PreparedSlices] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + sum(p.x.nbytes for p in self.models.values())


@dataclass(frozen=True)
class Taken:
    """What was read ahead for the files of one analysis (a snapshot)."""

    images: dict[Path, ImageFile]
    _slices: dict[tuple[str, str, int], tuple[PreparedSlices, int]]

    def headers(self) -> dict[Path, Dataset]:
        return {path: image.header for path, image in self.images.items()}

    def slice(
        self, model: str, sop_instance_uid: str, frame: int, plan: SlicePlan
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(network slice, probabilities) of one frame (1-based) if prepared under `plan`."""
        found = self._slices.get((model, sop_instance_uid, frame))
        if found is None or found[0].plan != plan:
            return None
        prepared, index = found
        return prepared.x[index], prepared.probabilities[index]


class ReadAhead:
    """The memo of images read and prepared ahead of their study's completion.

    Thread-safe: the streamer adds from its thread and a job takes from
    another, never at the same time (one lock): on two cores the two would
    only slow each other, and the job is what someone waits for.
    `max_bytes` bounds the memory it holds: past it, new images are left
    for the analysis at completion to read.
    """

    def __init__(self, models: Sequence[SliceModel], *, max_bytes: int) -> None:
        # Classifiers only: a detector's boxes are grouped over the whole series.
        self.models = [m for m in models if m.manifest.kind == "classification"]
        self.max_bytes = max_bytes
        self.lock = threading.RLock()
        self._entries: dict[Path, _Entry] = {}
        self._bytes = 0
        self._touched: dict[str, float] = {}
        # Studies being analysed or analysed (oldest first, bounded).
        self._closed: dict[str, None] = {}
        # Plans by model and plane geometry: each one costs a SimpleITK
        # orientation probe, and every slice of a series has the same.
        self._plans: dict[tuple[object, ...], SlicePlan | None] = {}

    @property
    def nbytes(self) -> int:
        return self._bytes

    def add(self, study_instance_uid: str, paths: Iterable[Path]) -> int:
        """Read and prepare the files not yet here; returns how many were prepared.

        Under the lock: a job waits for this chunk at most (hand in a few
        files at a time), and never runs beside it. A study whose analysis
        has begun (`close`) is skipped. An unreadable or unfit file is left
        alone: the analysis at completion reads it again and says what is
        wrong with it.
        """
        with self.lock:
            if study_instance_uid in self._closed:
                return 0
            new: list[tuple[Path, FileKey, ImageFile]] = []
            pending = 0  # bytes read in this call, not yet counted in `_bytes`
            for path in paths:
                key = file_key(path)
                known = self._entries.get(path)
                if key is None or (known is not None and known.key == key):
                    continue
                if self._bytes + pending >= self.max_bytes:
                    log.debug("read-ahead memory full (%d bytes): %s left for later",
                              self._bytes, path.name)  # fmt: skip
                    continue
                try:
                    image = read_image_file(path)
                except (SeriesQCError, OSError, ValueError) as exc:
                    log.debug("%s not read ahead: %s", path.name, exc)
                    continue
                if file_key(path) != key:  # replaced while being read
                    continue
                new.append((path, key, image))
                pending += image.nbytes
            if not new:
                return 0
            entries = [_Entry(key, study_instance_uid, image) for _, key, image in new]
            for model in self.models:
                self._prepare(model, entries)
            for (path, _, _), entry in zip(new, entries, strict=True):
                old = self._entries.pop(path, None)
                if old is not None:
                    self._bytes -= old.nbytes
                self._entries[path] = entry
                self._bytes += entry.nbytes
            self._touched[study_instance_uid] = time.monotonic()
            return len(new)

    def close(self, study_instance_uid: str) -> None:
        """Its analysis begins: read nothing more ahead for this study.

        A late image that re-opens it is read by its next analysis.
        """
        with self.lock:
            self._closed[study_instance_uid] = None
            while len(self._closed) > _CLOSED_KEPT:
                self._closed.pop(next(iter(self._closed)))

    def _prepare(self, model: SliceModel, entries: list[_Entry]) -> None:
        """Run `model` on the frames of the entries it applies to, grouped by plan."""
        spec = model.manifest.input
        groups: dict[SlicePlan, list[_Entry]] = {}
        for entry in entries:
            plan = self._plan(entry.image, model)
            if plan is not None:
                groups.setdefault(plan, []).append(entry)
        name = model_key(model.manifest)
        for plan, members in groups.items():
            values = np.stack([
                entry.image.modality_values(i)
                for entry in members for i in range(len(entry.image.frames))
            ])  # fmt: skip
            x = prepare_slices(values, plan, spec)
            probabilities = np.asarray(model.probabilities(x), dtype=np.float32)
            start = 0
            for entry in members:
                stop = start + len(entry.image.frames)
                entry.models[name] = PreparedSlices(plan, x[start:stop], probabilities[start:stop])
                start = stop

    def _plan(self, image: ImageFile, model: SliceModel) -> SlicePlan | None:
        """The model's plan for this file's frames, if the model applies and works slice-wise."""
        header = image.header
        reason = model.applicability(
            str(header.get("Modality", "") or "").upper(),
            str(header.get("BodyPartExamined", "") or "").strip() or None,
            str(header.get("SeriesDescription", "") or "").strip() or None,
            # The series is still arriving: its final count is checked at completion.
            model.manifest.applies_to.min_slices,
        )
        if reason is not None:
            return None
        plans = set()
        for frame in image.frames:
            if frame.orientation is None or frame.position is None:
                return None  # a projection image, or no geometry: prepared at completion
            if frame.pixel_spacing is None or frame.orientation.size != 6:
                return None
            key = (model_key(model.manifest), frame.columns, frame.rows, frame.pixel_spacing,
                   tuple(float(v) for v in frame.orientation))  # fmt: skip
            if key not in self._plans:
                if len(self._plans) >= _PLANS_KEPT:
                    self._plans.clear()
                self._plans[key] = _plan_of(frame.columns, frame.rows, frame.pixel_spacing,
                                            frame.orientation, model)  # fmt: skip
            plans.add(self._plans[key])
        if len(plans) != 1:
            return None
        return plans.pop()


    def take(self, paths: Iterable[Path]) -> Taken:
        """A snapshot of what was prepared for these files, still as they are on disk.

        Taken under the lock: a chunk the streamer is running now lands first.
        """
        wanted = [Path(p) for p in paths]
        with self.lock:
            found = [(p, self._entries.get(p)) for p in wanted]
        images: dict[Path, ImageFile] = {}
        slices: dict[tuple[str, str, int], tuple[PreparedSlices, int]] = {}
        for path, entry in found:
            if entry is None or file_key(path) != entry.key:
                continue
            images[path] = entry.image
            uid = str(entry.image.header.SOPInstanceUID)
            for name, prepared in entry.models.items():
                for i, frame in enumerate(entry.image.frames):
                    slices[(name, uid, frame.frame_number or 1)] = (prepared, i)
        return Taken(images, slices)

    def drop_study(self, study_instance_uid: str) -> None:
        with self.lock:
            for path in [p for p, e in self._entries.items()
                         if e.study_instance_uid == study_instance_uid]:  # fmt: skip
                self._bytes -= self._entries.pop(path).nbytes
            self._touched.pop(study_instance_uid, None)

    def drop_idle(self, seconds: float) -> list[str]:
        """Forget studies nothing was added to for `seconds` (their job went elsewhere)."""
        cutoff = time.monotonic() - seconds
        with self.lock:
            idle = [uid for uid, at in self._touched.items() if at < cutoff]
        for uid in idle:
            self.drop_study(uid)
        return idle


def _plan_of(
    columns: int, rows: int, pixel_spacing: tuple[float, float], orientation: np.ndarray,
    model: SliceModel,
) -> SlicePlan | None:  # fmt: skip
    """As `series_plan` makes it of the volume: direction (row, column, normal) as load_series."""
    row = orientation[:3] / np.linalg.norm(orientation[:3])
    col = orientation[3:] / np.linalg.norm(orientation[3:])
    direction = np.column_stack([row, col, np.cross(row, col)])
    spacing = (pixel_spacing[1], pixel_spacing[0])
    return plan_for(columns, rows, spacing, direction, model.manifest.input)
