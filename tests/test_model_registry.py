"""Model folders: integrity check, loading, identity and applicability."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom.uid import UID

from model.manifest import AppliesTo, ModelManifest
from model.registry import (
    ModelIntegrityError,
    ModelLoadError,
    ModelRegistry,
    builtin_model_dir,
    builtin_model_dirs,
    device_uid_from_sha256,
    load_model,
    sha256_bytes,
)


@pytest.fixture(scope="module")
def builtin() -> Path:
    return builtin_model_dir()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder: Path, **update: object) -> None:
    manifest = ModelManifest.from_file(folder / "manifest.toml")
    manifest.model_copy(update=update).write(folder / "manifest.toml")


def test_builtin_model_loads_on_cpu(builtin: Path) -> None:
    model = load_model(builtin, "cpu")
    assert model.device.type == "cpu"
    assert model.manifest.name == "secondreader-demo-nodule-ct"
    assert "Not for clinical use" in model.manifest.intended_use
    label = model.manifest.labels[0]
    assert (label.finding.value, label.finding.scheme) == ("27925004", "SCT")
    assert (label.site.value, label.site.meaning) == ("39607008", "Lung")
    assert model.sha256 == sha256_bytes((builtin / model.manifest.weights.file).read_bytes())
    assert builtin in builtin_model_dirs()


def test_weights_stay_small(builtin: Path) -> None:
    weights = builtin / ModelManifest.from_file(builtin / "manifest.toml").weights.file
    assert weights.stat().st_size < 2 * 1024 * 1024


def test_tampered_weights_are_refused(builtin: Path, tmp_path: Path) -> None:
    folder = _copy(builtin, tmp_path / "m")
    weights = folder / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, deep inside a tensor
    weights.write_bytes(bytes(data))
    expected = ModelManifest.from_file(folder / "manifest.toml").weights.sha256
    with pytest.raises(ModelIntegrityError) as info:
        load_model(folder, "cpu")
    err = info.value
    assert err.path == weights and err.expected == expected
    assert err.actual == sha256_bytes(bytes(data)) != expected
    assert str(weights) in str(err) and expected in str(err) and err.actual in str(err)


def test_missing_weights_and_foreign_architecture(builtin: Path, tmp_path: Path) -> None:
    folder = _copy(builtin, tmp_path / "m")
    (folder / "weights.pt").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(folder, "cpu")

    folder = _copy(builtin, tmp_path / "m2")
    manifest = ModelManifest.from_file(folder / "manifest.toml")
    weights = manifest.weights.model_copy(update={"architecture": "os:system"})
    _rewrite(folder, weights=weights)
    with pytest.raises(ModelLoadError, match="not one of"):
        load_model(folder, "cpu")


def test_manifest_with_wrong_label_count_fails_at_load(builtin: Path, tmp_path: Path) -> None:
    folder = _copy(builtin, tmp_path / "m")
    manifest = ModelManifest.from_file(folder / "manifest.toml")
    _rewrite(folder, labels=[manifest.labels[0], manifest.labels[0]])
    with pytest.raises(ModelLoadError, match="2 labels"):
        load_model(folder, "cpu")


def test_algorithm_info_identifies_the_weights(builtin: Path, tmp_path: Path) -> None:
    model = load_model(builtin, "cpu")
    info = model.algorithm_info()
    assert (info.name, info.version, info.manufacturer) == (
        model.manifest.name,
        model.manifest.version,
        "secondreader",
    )
    uid = UID(info.device_uid)
    assert uid.is_valid and uid.startswith("2.25.") and len(uid) <= 64
    assert info.device_uid == device_uid_from_sha256(model.sha256)
    assert info.parameters["threshold"] == f"{model.manifest.threshold:g}"
    # Same weights, same device; other weights, another device.
    assert load_model(builtin, "cpu").algorithm_info().device_uid == info.device_uid
    assert device_uid_from_sha256("f" * 64) != info.device_uid


def test_manifest_toml_round_trip(builtin: Path, tmp_path: Path) -> None:
    manifest = ModelManifest.from_file(builtin / "manifest.toml")
    manifest.write(tmp_path / "manifest.toml")
    assert ModelManifest.from_file(tmp_path / "manifest.toml") == manifest


def test_applicability(builtin: Path) -> None:
    model = load_model(builtin, "cpu")
    assert model.applicability("CT", "CHEST", "Thorax 1.0 B30f", 120) is None
    assert model.applicability("ct", "chest", None, 40) is None
    # BodyPartExamined is optional: its absence does not exclude a CT.
    assert model.applicability("CT", None, None, 40) is None
    assert model.applicability("CT", "", None, 40) is None
    reason = model.applicability("MR", "CHEST", None, 40)
    assert reason is not None and "MR" in reason
    reason = model.applicability("CT", "HEAD", None, 40)
    assert reason is not None and "HEAD" in reason
    reason = model.applicability("CT", "CHEST", None, 2)  # a localizer
    assert reason is not None and "at least" in reason


def test_registry_select_and_reasons(builtin: Path, tmp_path: Path) -> None:
    other = _copy(builtin, tmp_path / "lung-window")
    _rewrite(
        other,
        name="lung-window-only",
        applies_to=AppliesTo(modalities=["CT"], series_description=["*lung*"]),
    )
    registry = ModelRegistry([builtin, other], device="cpu")
    assert len(registry) == 2
    names = [m.name for m in registry.select("CT", "CHEST", "Lung 1.0 B70f", 60)]
    assert names == ["secondreader-demo-nodule-ct", "lung-window-only"]
    names = [m.name for m in registry.select("CT", "CHEST", "Mediastinum 3.0", 60)]
    assert names == ["secondreader-demo-nodule-ct"]
    reasons = registry.reasons("CT", "CHEST", "Mediastinum 3.0", 60)
    assert list(reasons) == ["lung-window-only"] and "*lung*" in reasons["lung-window-only"]
    assert registry.select("MR", "CHEST", "Lung", 60) == []
    assert registry.get("lung-window-only").folder == other


def test_registry_refuses_duplicate_names(builtin: Path) -> None:
    with pytest.raises(ModelLoadError, match="named"):
        ModelRegistry([builtin, builtin], device="cpu")


def test_two_versions_of_one_model_run_side_by_side(builtin: Path, tmp_path: Path) -> None:
    """Champion and challenger: the same name, two versions, both selected for a series."""
    challenger = _copy(builtin, tmp_path / "challenger")
    _rewrite(challenger, version="2.0.0", threshold=0.5)
    registry = ModelRegistry([builtin, challenger], device="cpu")
    chosen = registry.select("CT", "CHEST", "Thorax", 80)
    assert [(m.name, m.manifest.version) for m in chosen] == [
        ("secondreader-demo-nodule-ct", "1.1.0"),
        ("secondreader-demo-nodule-ct", "2.0.0"),
    ]
    infos = [m.algorithm_info() for m in chosen]
    assert infos[0].version != infos[1].version


def test_registry_defaults_to_builtin_models() -> None:
    registry = ModelRegistry(device="cpu")
    names = sorted(m.name for m in registry.models)
    assert names == ["secondreader-demo-nodule-cr", "secondreader-demo-nodule-ct"]
    ct = [m.name for m in registry.select("CT", "CHEST", "Thorax", 80)]
    assert ct == ["secondreader-demo-nodule-ct"]
    for modality in ("CR", "DX"):
        chosen = [m.name for m in registry.select(modality, "CHEST", "PA", 1)]
        assert chosen == ["secondreader-demo-nodule-cr"]
    reasons = registry.reasons("MR", "CHEST", None, 30)
    assert sorted(reasons) == names
    cr = registry.get("secondreader-demo-nodule-cr")
    assert cr.manifest.input.contrast == "histogram"
    assert cr.algorithm_info().device_uid != registry.get(ct[0]).algorithm_info().device_uid
