"""ONNX Runtime, and models that export their own class-activation map.

The built-in CT model exported to ONNX (`model export-onnx`) must give the
findings of the torch model it came from, and the same SR content: scores
within 1e-4, the same key image, point and box. Its saliency comes from the
map it exports, which for this architecture is Grad-CAM exactly
(model.networks.WithCam), so ONNX Runtime shows what torch shows. An ONNX
file from elsewhere comes in through `model import-onnx` and a manifest the
ML engineer writes; whatever does not fit is refused with one line and
leaves no folder behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tomli_w
import torch

from dicom_io.series import LoadedSeries, load_series
from dicom_io.sr.ai_result import build_ai_result_sr
from dicom_io.sr.reading import read_findings
from dicom_io.synthetic import write_ct_series
from model.analysis import analyse_series
from model.export import export_onnx, torchscript_with_cam
from model.inference import cam_saliency, predict
from model.phantom import phantom_volume
from model.preprocess import preprocess
from model.registry import (
    LoadedModel,
    ModelIntegrityError,
    builtin_model_dir,
    load_model,
)
from model.runtimes import TorchRuntime
from model.saliency import grad_cam, target_layer

CT = builtin_model_dir("ct-nodule")
CLI = [sys.executable, "-m", "daemon.cli"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(CT, tmp_path_factory.mktemp("onnx") / "ct-onnx")


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedSeries, list[Path]]:
    volume, centre = phantom_volume(11, n_slices=40, rows=256, cols=256, lesion=True)
    assert centre is not None
    files = write_ct_series(volume, tmp_path_factory.mktemp("ct"), spacing=(2.5, 1.4, 1.4))
    return load_series(files), files


def test_the_onnx_export_gives_the_torch_findings_and_sr_content(
    exported: Path, series: tuple[LoadedSeries, list[Path]], tmp_path: Path
) -> None:
    loaded, files = series
    torch_model, onnx_model = load_model(CT, "cpu"), load_model(exported, "cpu")
    assert onnx_model.runtime.name == "onnxruntime" and onnx_model.runtime.has_cam
    a, b = analyse_series(loaded, torch_model), analyse_series(loaded, onnx_model)

    assert len(a.findings) == len(b.findings) == 1
    for fa, fb in zip(a.findings, b.findings, strict=True):
        assert abs(fa.probability - fb.probability) <= 1e-4
        assert fa.present == fb.present and fa.threshold == fb.threshold
        assert fa.location is not None and fb.location is not None
        assert fa.location.sop_instance_uid == fb.location.sop_instance_uid
        np.testing.assert_allclose(fa.location.point, fb.location.point, atol=1e-3)
        assert fa.location.box is not None and fb.location.box is not None
        np.testing.assert_allclose(fa.location.box, fb.location.box, atol=1e-3)
    assert a.saliency is not None and b.saliency is not None
    np.testing.assert_allclose(a.saliency.frames, b.saliency.frames, atol=1e-3)

    # The SR as a PACS reads it back: everything but the device's own UIDs.
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    srs = [build_ai_result_sr(r, headers, series_number=901) for r in (a, b)]
    read = [read_findings(sr) for sr in srs]
    assert len(read[0]) == len(read[1]) == 1
    for ra, rb in zip(read[0], read[1], strict=True):
        pa, pb = ra.pop("probability"), rb.pop("probability")
        assert pa is not None and pb is not None and abs(pa - pb) <= 1e-4
        ra.pop("tracking_uid"), rb.pop("tracking_uid")  # the device UID is the weights' hash
        assert ra == rb
    # Which runtime made it is on record, in the SR's algorithm parameters.
    assert b.algorithm is not None and b.algorithm.parameters["runtime"] == "onnxruntime"


def test_the_exported_map_is_grad_cam(exported: Path, series: tuple) -> None:
    torch_model, onnx_model = load_model(CT, "cpu"), load_model(exported, "cpu")
    x = preprocess(series[0], torch_model.manifest.input).array[:, None][10:18]
    layer = target_layer(torch_model.network)
    assert layer is not None
    expected = grad_cam(torch_model.network, layer, torch.from_numpy(x), [0] * len(x))
    _, cam = onnx_model.runtime.forward(x)
    assert cam is not None and cam.shape == (8, 1, 16, 16)
    np.testing.assert_allclose(cam_saliency(cam, [0] * len(x), (128, 128)), expected, atol=1e-4)


def test_torchscript_with_its_own_map_gets_saliency(tmp_path: Path, series: tuple) -> None:
    torch_model = load_model(CT, "cpu")
    scripted = load_model(torchscript_with_cam(CT, tmp_path / "ts"), "cpu")
    assert scripted.runtime.name == "torchscript" and scripted.runtime.explainable() is None
    x = preprocess(series[0], torch_model.manifest.input).array
    got, expected = scripted.predict(x), torch_model.predict(x)
    assert got.saliency is not None and expected.saliency is not None
    np.testing.assert_allclose(got.probabilities, expected.probabilities, atol=1e-5)
    np.testing.assert_allclose(got.saliency, expected.saliency, atol=1e-4)
    # A TorchScript export of the logits alone has no saliency: nothing to hook.
    with torch.inference_mode(False):
        logits_only = torch.jit.trace(torch_model.network, torch.zeros(2, 1, 128, 128))
    plain = TorchRuntime(logits_only, torch_model.device)
    assert predict(plain, x[:4], channels=1, size=(128, 128), n_labels=1).saliency is None


def _manifest_for_import(exported: Path, tmp_path: Path, **changes: object) -> Path:
    with (exported / "manifest.toml").open("rb") as fh:
        raw = tomllib.load(fh)
    raw["weights"] = {"outputs": ["logits", "cam"]}  # file, sha256, format: the import's
    raw.update(changes)
    path = tmp_path / "vendor.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)  # fmt: skip


def test_import_onnx_then_check(exported: Path, tmp_path: Path) -> None:
    onnx_file = tmp_path / "vendor.onnx"
    shutil.copy(exported / "model.onnx", onnx_file)
    manifest = _manifest_for_import(exported, tmp_path, version="2.0.0")
    done = _cli("model", "import-onnx", onnx_file, "--manifest", manifest, "--into",
                tmp_path / "models" / "vendor", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "models" / "vendor"
    loaded = load_model(folder, "cpu")
    assert loaded.manifest.version == "2.0.0" and loaded.manifest.weights.format == "onnx"

    check = _cli("model", "check", folder, "--device", "cpu", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    # "  key (padded to 22)value", one row each after the heading.
    lines = {row[2:24].strip(): row[24:] for row in check.stdout.splitlines()[1:]}
    assert lines["runtime"] == "onnxruntime on cpu"
    assert lines["logits"] == "8 x 1" and lines["class-activation map"] == "8 x 1 x 16 x 16"
    assert lines["saliency from"] == "the model's class-activation map"
    assert "27925004 (SCT) Nodule" in lines["label"] and "39607008 (SCT) Lung" in lines["label"]

    # The bytes are pinned at import: a changed file is not this model any more.
    weights = folder / "model.onnx"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelIntegrityError):
        load_model(folder, "cpu")


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"labels": "two"}, "labels"),  # the graph gives one logit, the manifest lists two
        ({"weights": {"sha256": "ab" * 32}}, "SHA-256"),
        ({"intended_use": ""}, "intended_use"),
        ({"weights": {"outputs": ["logits"]}}, "outputs"),  # the graph returns two
    ],
    ids=["labels", "sha256", "intended-use", "outputs"],
)
def test_import_onnx_refuses_what_does_not_fit(
    exported: Path, tmp_path: Path, change: dict, says: str
) -> None:
    if change.get("labels") == "two":
        with (exported / "manifest.toml").open("rb") as fh:
            label = tomllib.load(fh)["labels"][0]
        change = {"labels": [label, {**label, "name": "mass"}]}
    manifest = _manifest_for_import(exported, tmp_path, **change)
    into = tmp_path / "models" / "vendor"
    done = _cli("model", "import-onnx", exported / "model.onnx", "--manifest", manifest,
                "--into", into, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
    assert last.startswith("secondreader: ") and says in last
    # Nothing half-made is left: no folder, no staging copy.
    assert not into.exists()
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


def test_a_folder_runs_in_the_registry_beside_the_torch_model(exported: Path) -> None:
    from model.registry import ModelRegistry

    # Same name and version as the torch folder: the registry refuses the pair,
    # as it would any version configured twice.
    with pytest.raises(Exception, match="two configured models"):
        ModelRegistry([CT, exported], device="cpu")
    models: list[LoadedModel] = ModelRegistry([exported], device="cpu").models
    assert [m.runtime.name for m in models] == ["onnxruntime"]


def _texts(item: pydicom.Dataset) -> list[str]:
    """Every TEXT value of an SR content tree."""
    out = [str(item.TextValue)] if "TextValue" in item else []
    for child in item.get("ContentSequence", []):
        out.extend(_texts(child))
    return out


def test_an_onnx_model_through_the_daemon_to_the_pacs(
    exported: Path, tmp_path: Path, daemon_factory, orthanc_factory  # type: ignore[no-untyped-def]
) -> None:
    """storescu -> `secondreader serve` with the ONNX folder as its model -> Orthanc."""
    from tests.conftest import storescu
    from tests.dicomgen import ct_study
    from tests.test_orthanc import by_class, delivery_config, fetch, open_db, outbox, runs

    orthanc = orthanc_factory().start()
    config = delivery_config(orthanc) + f'\n[models]\npaths = ["{exported}"]\n'
    daemon = daemon_factory(config, env={"SECONDREADER_WORKER__POLL_SECONDS": "0.3",
                                         "SECONDREADER_WORKER__DEVICE": "cpu"}).start()
    files = ct_study(tmp_path / "ct", 20, size=128, seed=3)
    sent = storescu(daemon.port, files)
    assert sent.returncode == 0, sent.stderr
    db = open_db(daemon)
    daemon.wait_for(lambda: outbox(db) and all(i.state == "done" for i in outbox(db)),
                    timeout=120)  # fmt: skip
    [run] = runs(db)
    assert run.outcome == "analysed" and run.model_name == "secondreader-demo-nodule-ct"
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    [entry] = by_class(orthanc.study_instances(study_uid), "1.2.840.10008.5.1.4.1.1.88.34")
    sr, _ = fetch(orthanc, entry, tmp_path / "from-orthanc")
    [read] = read_findings(sr)
    # What the torch model finds in the same images, as the PACS got it from ONNX Runtime.
    [expected] = analyse_series(load_series(files), load_model(CT, "cpu")).findings
    assert read["probability"] is not None
    assert abs(read["probability"] - expected.probability) <= 1e-4
    assert read["present"] == expected.present
    # The SR's algorithm parameters say which runtime computed it.
    assert "runtime=onnxruntime" in _texts(sr)
    assert daemon.stop() == 0
    db.dispose()
