"""Several series as the channels of one input: T1, T2 and FLAIR on the T1's grid.

The three series of a synthetic brain MR lie in one frame of reference, each
on its own grid (matrix, pixel size, slice thickness, origin). Each holds a
linear ramp along one patient axis, which linear resampling reproduces
exactly inside the volume: so channel c of the network input must equal
that series' ramp at the very patient coordinates of the reference's
network pixel. The rules find each series by its description and its
sequence, in any order of arrival; a missing series or another frame of
reference is refused with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.uid import generate_uid
from torch import nn

from dicom_io.series import load_series
from dicom_io.synthetic import FLAIR, T1, T2, MRSequence, write_mr_series
from model import channels
from model.analysis import analyse_study
from model.manifest import MANIFEST_NAME, InputSpec, ModelManifest
from model.registry import load_model, sha256_bytes
from model.results import Outcome
from tests.dicom_validate import dciodvfy_errors

RULES = [
    {"name": "T1", "series_description": ["*t1*"]},
    {"name": "T2", "series_description": ["*t2*"], "not_series_description": ["*flair*"]},
    {"name": "FLAIR", "scanning_sequence": ["IR"]},
]
SPEC = InputSpec.model_validate({
    "orientation": "LPS", "size": [64, 64], "denoise": "none", "contrast": "window",
    "window": [1500.0, 3000.0], "channels": 3, "channel_series": RULES,
})  # fmt: skip
# Each series is a ramp along one patient axis (mm): T1 along x, T2 along y, FLAIR along z.
RAMPS = {"T1": (0, 1200.0), "T2": (1, 1250.0), "FLAIR": (2, 1300.0)}
SLOPE = 10.0  # signal per mm: a pixel's shift (>= 1.6 mm) is 16, a stored value's rounding 0.5


def _ramp(axis: int, offset: float, grid: tuple[int, int, int], spacing: tuple[float, ...],
          origin: tuple[float, float, float]) -> np.ndarray:  # fmt: skip
    """Signal offset + SLOPE x coordinate on an axial grid (z, y, x), LPS directions."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in grid), indexing="ij")
    coordinate = (origin[0] + x * spacing[2], origin[1] + y * spacing[1],
                  origin[2] + z * spacing[0])[axis]  # fmt: skip
    return offset + SLOPE * np.asarray(coordinate, dtype=np.float64)


def _write(folder: Path, sequence: MRSequence, name: str, grid: tuple[int, int, int],
           spacing: tuple[float, float, float], origin: tuple[float, float, float],
           study: str, frame: str, number: int) -> list[Path]:  # fmt: skip
    axis, offset = RAMPS[name]
    volume = _ramp(axis, offset, grid, spacing, origin)
    return write_mr_series(volume, folder / name, sequence, spacing=spacing, origin=origin,
                           study_uid=study, frame_of_reference_uid=frame,
                           series_number=number)  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root, uid, frame = tmp_path_factory.mktemp("mr"), generate_uid(), generate_uid()
    return {
        # FLAIR first and with the most images: the rules, not the order or the size, choose.
        "FLAIR": _write(root, FLAIR, "FLAIR", (30, 72, 72), (4.0, 3.0, 3.0),
                        (-110.0, -110.0, -60.0), uid, frame, 4),
        "T1": _write(root, T1, "T1", (24, 128, 128), (5.0, 1.6, 1.6), (-100.0, -100.0, -50.0),
                     uid, frame, 2),
        "T2": _write(root, T2, "T2", (20, 96, 96), (6.0, 2.3, 2.3), (-105.0, -105.0, -55.0),
                     uid, frame, 3),
    }  # fmt: skip


def test_each_channel_is_its_series_at_the_reference_pixels(study: dict) -> None:
    loaded = {name: load_series(paths) for name, paths in study.items()}
    chosen, missing = channels.choose(list(loaded.values()), SPEC.channel_series)
    assert missing is None
    assert [s.series_description for s in chosen] == ["T1 SE AX", "T2 TSE AX", "T2 FLAIR AX"]
    pre = channels.stack(chosen[0], chosen[1:], SPEC)  # type: ignore[arg-type]
    assert pre.channels is not None and pre.channels.shape == (24, 3, 64, 64)
    assert np.array_equal(pre.channels[:, 0], pre.array)
    for c, name in enumerate(["T1", "T2", "FLAIR"]):
        axis, offset = RAMPS[name]
        worst = 0.0
        for k in (2, 12, 20):
            for r, col in ((5, 5), (32, 40), (58, 20)):
                point = pre.image.TransformIndexToPhysicalPoint((col, r, k))
                signal = offset + SLOPE * point[axis]
                # The window (1500, 3000) maps signal s to s / 3000, clipped to [0, 1].
                worst = max(worst, abs(pre.channels[k, c, r, col] - signal / 3000.0))
        # Within the rounding of the stored values (0.5 / 3000); one pixel off is 5e-3.
        assert worst < 2e-4, f"{name}: channel {c} differs by {worst}"


class _ChannelMeans(nn.Module):
    """One logit per channel: its mean over the slice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _model_folder(folder: Path) -> Path:
    folder.mkdir()
    scripted = torch.jit.script(_ChannelMeans())
    scripted.save(str(folder / "model.ts"))
    code = {"value": "126952004", "scheme": "SCT", "meaning": "Neoplasm of brain"}
    site = {"value": "12738006", "scheme": "SCT", "meaning": "Brain"}
    manifest = ModelManifest.model_validate({
        "name": "channel-means", "version": "1", "intended_use": "A test of channel routing.",
        "applies_to": {"modalities": ["MR"]}, "input": SPEC.model_dump(), "threshold": 0.5,
        "labels": [{"name": n, "finding": code, "site": site} for n in ("t1", "t2", "flair")],
        "weights": {"file": "model.ts", "format": "torchscript",
                    "sha256": sha256_bytes((folder / "model.ts").read_bytes())},
    })  # fmt: skip
    manifest.write(folder / MANIFEST_NAME)
    return folder


def test_the_model_gets_each_series_in_its_channel(study: dict, tmp_path: Path) -> None:
    model = load_model(_model_folder(tmp_path / "m"), "cpu")
    loaded = [load_series(paths) for paths in study.values()]
    [result] = analyse_study(loaded, [model])
    assert result.outcome == Outcome.ANALYSED
    assert result.series_instance_uid == loaded[1].series_instance_uid  # the T1: the reference
    pre = channels.stack(loaded[1], [loaded[2], loaded[0]], SPEC)
    assert pre.channels is not None
    for c, finding in enumerate(result.findings):
        # The study probability is the maximum over slices of sigmoid(mean of channel c).
        logit = np.log(finding.probability / (1.0 - finding.probability))
        assert abs(logit - pre.channels[:, c].mean(axis=(1, 2)).max()) < 1e-5
    [step] = [s for s in result.provenance if s["name"] == "channels"]
    assert step["parameters"]["series"] == [loaded[i].series_instance_uid for i in (1, 2, 0)]


def test_a_missing_series_or_another_frame_of_reference_is_refused(
    study: dict, tmp_path: Path
) -> None:
    model = load_model(_model_folder(tmp_path / "m"), "cpu")
    without_flair = [load_series(study[n]) for n in ("T1", "T2")]
    [result] = analyse_study(without_flair, [model])
    assert result.outcome == Outcome.NOT_APPLICABLE
    assert result.reason == "channel-means needs no FLAIR series (Scanning Sequence with IR)"

    uid = str(without_flair[0].study_instance_uid)
    moved = _write(tmp_path, FLAIR, "FLAIR", (30, 72, 72), (4.0, 3.0, 3.0),
                   (-110.0, -110.0, -60.0), uid, generate_uid(), 4)  # fmt: skip
    [result] = analyse_study([*without_flair, load_series(moved)], [model])
    assert result.outcome == Outcome.FAILED_QC
    assert result.reason is not None and "not in one frame of reference" in result.reason


def test_the_synthetic_mr_series_are_valid_dicom(study: dict) -> None:
    for paths in study.values():
        assert dciodvfy_errors(paths[0]) == []
