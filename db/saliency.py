"""The saliency file format: one compressed NumPy archive per run, under the state folder.

Written by the analyse stage with the run (db/results.py), read by the report stage
and the web page; the folder is `SALIENCY_DIR` of db/layout.py. A segmentation
model's regions (`LabelMap`) travel in the same archive, under `label_*` keys."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from db.layout import SALIENCY_DIR
from model.results import (
    AnalysisResult,
    LabelMap,
    SaliencyMap,
)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def read_saliency(path: Path) -> SaliencyMap:
    """A saliency map as `finish_job` wrote it."""
    with np.load(path, allow_pickle=False) as npz:
        frame_numbers = npz.get("source_frame_numbers")
        return SaliencyMap(
            series_instance_uid=str(npz["series_instance_uid"]),
            source_sop_instance_uids=[str(u) for u in npz["source_sop_instance_uids"]],
            frames=npz["frames"].astype(np.float32),
            source_frame_numbers=None if frame_numbers is None else frame_numbers.tolist(),
        )


def read_label_map(path: Path) -> LabelMap | None:
    """A segmentation's regions from the run's archive; None where the run has none."""
    with np.load(path, allow_pickle=False) as npz:
        if "label_frames" not in npz:
            return None
        frame_numbers = npz.get("label_source_frame_numbers")
        return LabelMap(
            series_instance_uid=str(npz["label_series_instance_uid"]),
            source_sop_instance_uids=[str(u) for u in npz["label_source_sop_instance_uids"]],
            frames=npz["label_frames"].astype(np.uint16),
            source_frame_numbers=None if frame_numbers is None else frame_numbers.tolist(),
        )


def write_saliency(state_dir: Path, study_uid: str, run_id: int, result: AnalysisResult) -> str:
    """Write <state_dir>/saliency/<study UID>/run-<id>.npz atomically; returns the relative path.

    Written inside the run's transaction: if that rolls back, an orphan file
    stays behind, which is harmless; a committed run never lacks its file.
    """
    sal = result.saliency
    assert sal is not None
    if not _UID.match(study_uid):
        raise ValueError("not a valid study UID; refusing to build a path from it")
    frames = np.asarray(sal.frames, dtype=np.float32)
    if frames.ndim != 3 or frames.shape[0] != len(sal.source_sop_instance_uids):
        raise ValueError("saliency frames must be (n, rows, cols), one per source image")
    relative = f"{SALIENCY_DIR}/{study_uid}/run-{run_id}.npz"
    target = state_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {
        "frames": frames,
        "series_instance_uid": np.array(sal.series_instance_uid),
        "source_sop_instance_uids": np.array(sal.source_sop_instance_uids, dtype=str),
    }
    if sal.source_frame_numbers is not None:
        arrays["source_frame_numbers"] = np.asarray(sal.source_frame_numbers, dtype=np.int32)
    regions = result.label_map
    if regions is not None:
        if regions.frames.ndim != 3 or regions.frames.shape[0] != len(
                regions.source_sop_instance_uids):  # fmt: skip
            raise ValueError("label map frames must be (n, rows, cols), one per source image")
        arrays["label_frames"] = np.asarray(regions.frames, dtype=np.uint16)
        arrays["label_series_instance_uid"] = np.array(regions.series_instance_uid)
        arrays["label_source_sop_instance_uids"] = np.array(regions.source_sop_instance_uids,
                                                            dtype=str)
        if regions.source_frame_numbers is not None:
            arrays["label_source_frame_numbers"] = np.asarray(regions.source_frame_numbers,
                                                              dtype=np.int32)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return relative
