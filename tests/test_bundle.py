"""MONAI bundles become model folders without their config ever being executed.

The bundles here are made by hand after MONAI's bundle specification
(configs/metadata.json, configs/inference.json, models/model.ts or
model.pt). The CT one carries the built-in CT network as a MONAI network
would be: reading each slice in MONAI's (x, y) axis order. Its preprocessing,
written as MONAI transforms, translates into the built-in manifest's input
but for the denoising, which MONAI's vocabulary does not state in mm; so its
findings are compared with the built-in network run without it, and must
agree within 1e-5 (the same arithmetic, the transposition exact both ways).
Hostile bundles would touch a marker file if their config were run: they are
refused by key, and the marker never appears. monai's own parser is never
called here, not even to make the bundles.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
import torch
from torch import nn

from dicom_io.series import LoadedSeries, load_series
from dicom_io.synthetic import write_ct_series
from model.analysis import analyse_series
from model.bundle import BundleError, bundle_manifest, import_bundle, translate
from model.manifest import ModelManifest
from model.networks import WithCam
from model.phantom import phantom_volume
from model.registry import builtin_model_dir, load_model

CT = builtin_model_dir("ct-nodule")
CLI = [sys.executable, "-m", "daemon.cli"]
BUILTIN = ModelManifest.from_file(CT / "manifest.toml")


class _MonaiLayout(nn.Module):
    """The built-in network as MONAI would train it: slices arrive as (x, y), maps leave so."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cam = self.inner(x.transpose(-1, -2))
        return logits, cam.transpose(-1, -2)


def _metadata(size: list[int], **pred: Any) -> dict[str, Any]:
    return {
        "version": "0.3.1", "name": "ct_nodule_2d", "monai_version": "1.6.1",
        "description": "A 2D lung nodule classifier for axial CT slices.",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT",
                                 "num_channels": 1, "spatial_shape": size, "dtype": "float32",
                                 "value_range": [0, 1], "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "probabilities", "format": "classes",
                                 "num_channels": 1, "spatial_shape": [1], "dtype": "float32",
                                 "value_range": [0, 1], "channel_def": {"0": "nodule"}} | pred},
        },
    }


def _ct_config() -> dict[str, Any]:
    """The built-in CT input as MONAI transforms (window -400/1500 = range -1150..350)."""
    keys = "@image_key"
    return {
        "image_key": "image",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": keys},
            {"_target_": "EnsureChannelFirstd", "keys": keys},
            {"_target_": "Orientationd", "keys": keys, "axcodes": "LPS"},
            {"_target_": "Resized", "keys": keys, "spatial_size": [128, 128], "mode": "bilinear"},
            {"_target_": "monai.transforms.ScaleIntensityRanged", "keys": keys, "a_min": -1150,
             "a_max": 350, "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": keys},
        ]},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
        ]},
    }


def _write(root: Path, metadata: dict[str, Any], config: dict[str, Any],
           models: dict[str, bytes]) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    for name, data in models.items():
        (root / "models" / name).write_bytes(data)
    return root


def _extra(path: Path, **changes: Any) -> Path:
    """What the bundle cannot say: SNOMED CT codes, whom it is for, the threshold and the
    calibration that goes with it (the built-in's: the network is the built-in's)."""
    assert BUILTIN.calibration is not None
    raw = {
        "intended_use": "Test bundle: the demonstration CT model. Not for clinical use.",
        "applies_to": BUILTIN.applies_to.model_dump(),
        "threshold": BUILTIN.threshold,
        "calibration": BUILTIN.calibration.model_dump(),
        "labels": [lb.model_dump() for lb in BUILTIN.labels],
        "weights": {"outputs": ["logits", "cam"]},
    } | changes
    path.write_text(tomli_w.dumps(raw))
    return path


@pytest.fixture(scope="module")
def ct_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    network = load_model(CT, "cpu").network
    with torch.inference_mode(False):
        traced = torch.jit.trace(_MonaiLayout(WithCam(network)).eval(),
                                 torch.zeros(2, 1, 128, 128), check_trace=False)
    ts = tmp_path_factory.mktemp("ts") / "model.ts"
    torch.jit.save(traced, str(ts))
    root = tmp_path_factory.mktemp("bundles") / "ct_nodule_2d"
    return _write(root, _metadata([128, 128]), _ct_config(), {"model.ts": ts.read_bytes()})


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> LoadedSeries:
    volume, centre = phantom_volume(11, n_slices=40, rows=256, cols=256, lesion=True)
    assert centre is not None
    return load_series(write_ct_series(volume, tmp_path_factory.mktemp("ct"),
                                       spacing=(2.5, 1.4, 1.4)))


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)  # fmt: skip


def test_a_ct_bundle_imports_through_the_cli_and_finds_what_the_builtin_finds(
    ct_bundle: Path, series: LoadedSeries, tmp_path: Path
) -> None:
    into = tmp_path / "models" / "ct-bundle"
    done = _cli("model", "import-bundle", ct_bundle, "--manifest", _extra(tmp_path / "x.toml"),
                "--into", into, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    bundle = load_model(into, "cpu")
    m = bundle.manifest
    assert m.name == "ct_nodule_2d" and m.version == "0.3.1"
    assert m.training["bundle"] == "ct_nodule_2d" and m.training["bundle_version"] == "0.3.1"
    assert m.description.startswith("From MONAI bundle ct_nodule_2d 0.3.1")
    # The translation is the built-in input but for the smoothing, read in MONAI's axis order.
    same = BUILTIN.input.model_copy(update={"denoise": "none", "layout": "columns_rows"})
    assert m.input == same and m.weights.format == "torchscript"
    assert m.labels == BUILTIN.labels and m.threshold == BUILTIN.threshold
    assert m.calibration == BUILTIN.calibration

    reference = tmp_path / "builtin-no-denoise"
    reference.mkdir()
    shutil.copy(CT / "weights.pt", reference / "weights.pt")
    BUILTIN.model_copy(update={"input": same.model_copy(update={"layout": "rows_columns"})}
                       ).write(reference / "manifest.toml")
    a, b = analyse_series(series, load_model(reference, "cpu")), analyse_series(series, bundle)
    assert len(a.findings) == len(b.findings) == 1
    fa, fb = a.findings[0], b.findings[0]
    assert abs(fa.probability - fb.probability) <= 1e-5 and fa.present and fb.present
    assert fa.location is not None and fb.location is not None
    assert fa.location.sop_instance_uid == fb.location.sop_instance_uid
    np.testing.assert_allclose(fa.location.point, fb.location.point, atol=1e-3)


def test_a_zip_of_the_bundle_imports_identically(ct_bundle: Path, tmp_path: Path) -> None:
    archive = tmp_path / "ct_nodule_2d.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(ct_bundle.rglob("*")):
            if path.is_file():
                zf.write(path, f"ct_nodule_2d/{path.relative_to(ct_bundle)}")
    extra = _extra(tmp_path / "x.toml")
    import_bundle(ct_bundle, extra, tmp_path / "from-folder")
    import_bundle(archive, extra, tmp_path / "from-zip")
    for name in ("manifest.toml", "model.ts"):
        assert (tmp_path / "from-folder" / name).read_bytes() == (
            tmp_path / "from-zip" / name).read_bytes()


def test_a_state_dict_bundle_with_an_allowed_monai_network_imports_and_probes(
    tmp_path: Path
) -> None:
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    state = DenseNet121(spatial_dims=2, in_channels=1, out_channels=1).state_dict()
    pt = tmp_path / "model.pt"
    torch.save(state, pt)
    config = _ct_config()
    config["network_def"] = {"_target_": "monai.networks.nets.DenseNet121", "spatial_dims": 2,
                             "in_channels": 1, "out_channels": 1}
    transforms = config["preprocessing"]["transforms"]
    transforms[3]["spatial_size"] = [64, 48]  # (x, y): 48 rows of 64 columns
    transforms[4] = {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True}
    bundle = _write(tmp_path / "densenet", _metadata([64, 48]), config,
                    {"model.pt": pt.read_bytes()})
    import_bundle(bundle, _extra(tmp_path / "x.toml", weights={}), tmp_path / "folder")
    loaded = load_model(tmp_path / "folder", "cpu")
    m = loaded.manifest
    assert m.weights.architecture == "monai.networks.nets:DenseNet121"
    assert m.weights.arguments == {"spatial_dims": 2, "in_channels": 1, "out_channels": 1}
    assert (m.input.contrast, m.input.zscore_nonzero, m.input.size) == ("zscore", True, (48, 64))
    x = np.random.default_rng(0).normal(size=(2, 48, 64)).astype(np.float32)
    assert loaded.probabilities(x).shape == (2, 1)


def _hostile(tmp_path: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """Bundles that would touch `marker` if their config ran: (bundle, key the refusal names)."""
    ts = {"model.ts": b"not read: refused before"}
    run = _ct_config()
    run["preprocessing"]["transforms"].insert(2, {
        "_target_": "subprocess.run", "args": ["touch", str(marker)]})
    expr = _ct_config()
    expr["preprocessing"]["transforms"][0]["keys"] = (
        f"$__import__('pathlib').Path({str(marker)!r}).touch()")
    archive = tmp_path / "dotdot.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("b/configs/metadata.json", json.dumps(_metadata([128, 128])))
        zf.writestr("b/configs/inference.json", json.dumps(_ct_config()))
        zf.writestr("b/models/model.ts", b"x")
        zf.writestr(f"../{marker.name}", b"x")
    return {
        "target": (_write(tmp_path / "run", _metadata([128, 128]), run, ts),
                   "preprocessing#transforms#2#_target_: 'subprocess.run'"),
        "expression": (_write(tmp_path / "expr", _metadata([128, 128]), expr, ts),
                       "preprocessing#transforms#0#keys"),
        "zip-dotdot": (archive, f"'../{marker.name}'"),
    }


@pytest.mark.parametrize("kind", ["target", "expression", "zip-dotdot"])
def test_hostile_bundles_are_refused_by_key_and_nothing_runs(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "MARKER"
    bundle, key = _hostile(tmp_path, marker)[kind]
    into = tmp_path / "models" / "hostile"
    done = _cli("model", "import-bundle", bundle, "--manifest", _extra(tmp_path / "x.toml"),
                "--into", into, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secondreader: ") and key in lines[0]
    assert not marker.exists() and not (tmp_path.parent / marker.name).exists()
    assert not into.exists()
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


@pytest.mark.parametrize(("shape", "pred", "dims"), [
    ([96, 96, 96], {"type": "probabilities", "format": "classification"}, 3),
    ([128, 128], {"type": "image", "format": "segmentation", "spatial_shape": [128, 128]}, 2),
])  # fmt: skip
def test_a_3d_classifier_or_a_2d_segmentation_bundle_is_not_hostable_yet(
    tmp_path: Path, shape: list[int], pred: dict[str, Any], dims: int
) -> None:
    meta = _metadata(shape, num_channels=2, **pred)
    config = _ct_config()
    config["network_def"] = {"_target_": "UNet", "spatial_dims": dims}
    bundle = _write(tmp_path / "other", meta, config, {"model.ts": b"x"})
    with pytest.raises(BundleError, match=r"not hostable yet; secondreader hosts 2D per-slice "
                                          r"classifiers and 3D segmentation networks"):
        bundle_manifest(bundle, _extra(tmp_path / "x.toml"))


def _transform(index: int, **changes: Any) -> dict[str, Any]:
    config = _ct_config()
    config["preprocessing"]["transforms"][index] |= changes
    return config


@pytest.mark.parametrize(
    ("config", "says"),
    [
        (_transform(3, mode="area"), "preprocessing#transforms#3#mode"),
        (_transform(4, clip=False), "preprocessing#transforms#4#b_min: ScaleIntensityRanged"),
        (_transform(2, axcodes="PLI"), "preprocessing#transforms#2#axcodes"),
        (_transform(5, _target_="CropForegroundd"), "grid follows the series' geometry"),
        (_transform(5, _target_="Spacingd", pixdim=[1.0, 1.0]), "resamples after the intensity"),
        (_transform(5, _target_="NormalizeIntensityd"), "a second intensity step"),
    ],
    ids=["resize-area", "no-clip", "axcodes", "crop-foreground", "order", "two-intensity"],
)
def test_what_cannot_be_translated_is_refused_by_key(config: dict[str, Any], says: str) -> None:
    with pytest.raises(BundleError, match=re.escape(says)):
        translate(config)


def test_softmax_and_unknown_postprocessing_are_refused() -> None:
    config = _ct_config()
    config["postprocessing"]["transforms"][0] = {"_target_": "Activationsd", "softmax": True}
    with pytest.raises(BundleError, match="postprocessing#transforms#0#softmax"):
        translate(config)


def test_the_extra_toml_gives_snomed_codes_and_no_preprocessing(
    ct_bundle: Path, tmp_path: Path
) -> None:
    label = BUILTIN.labels[0].model_dump()
    local = {**label, "finding": {**label["finding"], "scheme": "99LOCAL"}}
    with pytest.raises(BundleError, match="SNOMED CT"):
        bundle_manifest(ct_bundle, _extra(tmp_path / "a.toml", labels=[local]))
    with pytest.raises(BundleError, match="input not taken here"):
        bundle_manifest(ct_bundle, _extra(tmp_path / "b.toml", input={"denoise": "gaussian"}))
    with pytest.raises(BundleError, match="intended_use is empty"):
        bundle_manifest(ct_bundle, _extra(tmp_path / "c.toml", intended_use=""))
    manifest, _ = bundle_manifest(ct_bundle, _extra(tmp_path / "d.toml"))
    assert tomllib.loads(manifest.to_toml())["training"]["source"] == "MONAI bundle"
