"""Training and evaluation: recorded metrics reproduce, short runs make loadable models."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_io.synthetic import write_ct_series
from model.datasets import (
    LabelledStudy,
    find_study_series,
    load_labelled_studies,
    read_label_csv,
    read_series,
    split_studies,
)
from model.intervals import wilson
from model.manifest import ModelManifest
from model.phantom import phantom_radiograph, phantom_volume
from model.registry import builtin_model_dirs, load_model, sha256_bytes
from model.train import CT_INPUT, evaluate, roc_auc, roc_curve, train, youden_threshold


def _mann_whitney_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y], s[~y]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def test_auc_matches_mann_whitney_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    s = np.round(rng.random(300) + 0.5 * y, 1)  # coarse scores: many ties
    assert roc_auc(y, s) == pytest.approx(_mann_whitney_auc(y, s), abs=1e-12)
    fpr, tpr, thr = roc_curve(y, s)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.isinf(thr[0])


def test_auc_extremes_and_youden() -> None:
    y = np.array([0, 0, 0, 1, 1], bool)
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.8])
    assert roc_auc(y, s) == 1.0 and roc_auc(y, -s) == 0.0
    t = youden_threshold(y, s)
    assert 0.3 < t <= 0.7 and ((s >= t) == y).all()
    with pytest.raises(ValueError):
        roc_auc(np.ones(3, bool), s[:3])


@pytest.mark.parametrize("folder", builtin_model_dirs(), ids=lambda p: p.name)
def test_builtin_model_reproduces_its_recorded_test_metrics(folder: Path) -> None:
    manifest = ModelManifest.from_file(folder / "manifest.toml")
    recorded = manifest.metrics
    measured = evaluate(folder, device="cpu")
    assert measured["n"] == recorded["n_test"] == manifest.training["n_test"]
    keys = ["auc", "sensitivity", "specificity", "ece", "brier", "ece_uncalibrated"]
    if manifest.training["kind"] == "ct":  # whole series as well as slices
        assert measured["n_studies"] == recorded["n_test_studies"]
        keys += ["study_auc", "study_sensitivity", "study_specificity", "study_ece",
                 "study_brier", "study_ece_uncalibrated"]
        assert measured["study_auc"] >= 0.9
    for key in keys:
        assert measured[key] == pytest.approx(recorded[key], abs=1e-6), key
    assert measured["auc"] >= 0.95
    # Each rate with its 95 % Wilson interval, from the counts behind it.
    prefixes = ["", "study_"] if manifest.training["kind"] == "ct" else [""]
    for prefix in prefixes:
        n = "n_studies" if prefix else "n"
        positives = int(measured[f"{n}_positive"])
        found = round(measured[f"{prefix}sensitivity"] * positives)
        interval = wilson(found, positives)
        assert measured[f"{prefix}sensitivity_low"] == pytest.approx(interval.low, abs=1e-6)
        assert measured[f"{prefix}sensitivity_high"] == pytest.approx(interval.high, abs=1e-6)
        assert (measured[f"{prefix}specificity_low"] <= measured[f"{prefix}specificity"]
                <= measured[f"{prefix}specificity_high"])  # fmt: skip
    for png in ("learning_curves.png", "roc.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_both_builtin_models_ship() -> None:
    assert [p.name for p in builtin_model_dirs()] == ["cr-nodule", "ct-nodule"]


def test_short_training_run_is_complete_and_reproducible(tmp_path: Path) -> None:
    kwargs = dict(
        seed=3,
        n_train=48,
        n_val=24,
        n_test=24,
        n_val_studies=10,  # 5 of each label: the fewest a calibration is fitted on
        n_test_studies=4,
        epochs=2,
        batch_size=16,
        progress=False,
        device="cpu",
    )
    report = train(tmp_path / "a", **kwargs)
    folder = tmp_path / "a"
    for name in ("manifest.toml", "weights.pt", "learning_curves.png", "roc.png"):
        assert (folder / name).is_file(), name
    assert 1 <= report.epochs_run <= 2 and 1 <= report.best_epoch <= report.epochs_run
    assert len(report.history) == report.epochs_run
    manifest = ModelManifest.from_file(folder / "manifest.toml")
    assert manifest.training["seed"] == 3 and manifest.training["n_test"] == 24
    assert manifest.metrics["n_test"] == 24 and 0.0 <= manifest.metrics["auc"] <= 1.0
    assert manifest.metrics["n_test_studies"] == 4
    assert manifest.training["threshold_from"] == "validation studies"
    assert manifest.threshold == pytest.approx(report.threshold, abs=1e-6)
    # Calibrated on the validation series, the threshold on the calibrated probability.
    assert manifest.calibration is not None
    assert manifest.calibration.fitted_on == "10 validation studies (synthetic ct, seed 3)"
    assert manifest.training["calibration_from"] == manifest.calibration.fitted_on
    assert manifest.input == CT_INPUT
    model = load_model(folder, "cpu")
    assert model.sha256 == manifest.weights.sha256
    # `evaluate` rebuilds the same test sets from the manifest.
    measured = evaluate(folder, device="cpu")
    assert measured["auc"] == pytest.approx(manifest.metrics["auc"], abs=1e-6)
    assert measured["study_sensitivity"] == pytest.approx(manifest.metrics["study_sensitivity"])
    for key in ("ece", "brier", "study_ece", "study_brier", "study_ece_uncalibrated"):
        assert measured[key] == pytest.approx(manifest.metrics[key], abs=1e-6), key
    # Same seed, same weights, bit for bit.
    train(tmp_path / "b", **kwargs)
    assert sha256_bytes((tmp_path / "b" / "weights.pt").read_bytes()) == model.sha256


def _write_site_data(root: Path) -> Path:
    """Six small labelled chest CT studies, one unlabelled study and a stray file."""
    rows = []
    for i in range(7):
        lesion = i % 2 == 0
        vol, _ = phantom_volume(100 + i, 6, 96, 96, (2.5, 3.75, 3.75), lesion=lesion)
        uid = f"1.2.826.0.1.3680043.8.498.{1000 + i}"
        write_ct_series(
            vol,
            root / f"study{i}",
            spacing=(2.5, 3.75, 3.75),
            study_uid=uid,
            seed=i,
            shuffle_instance_numbers=True,
        )
        if i < 6:
            rows.append((uid, "1" if lesion else "0"))
    (root / "README.txt").write_text("not DICOM")
    csv_path = root.parent / "labels.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_uid", "label"])
        writer.writerows(rows)
    return csv_path


def test_training_from_csv_and_dicom_folder(tmp_path: Path) -> None:
    root = tmp_path / "dicom"
    csv_path = _write_site_data(root)
    labels = read_label_csv(csv_path)
    assert len(labels) == 6 and sum(labels.values()) == 3
    series = find_study_series(root, set(labels))
    assert set(series) == set(labels)  # the unlabelled study is ignored
    assert all(len(files) == 6 for files in series.values())

    studies = load_labelled_studies(csv_path, root, CT_INPUT)
    assert [s.slices.shape for s in studies] == [(6, 128, 128)] * 6
    assert all(s.slices.min() >= 0.0 and s.slices.max() <= 1.0 for s in studies)

    out = tmp_path / "site-model"
    report = train(
        out,
        csv=csv_path,
        dicom_root=root,
        epochs=1,
        batch_size=4,
        seed=1,
        progress=False,
        device="cpu",
    )
    manifest = ModelManifest.from_file(out / "manifest.toml")
    assert manifest.training["source"] == "csv"
    assert manifest.name == "site-nodule-ct"
    assert "Not for clinical use" not in manifest.intended_use
    # One test study of each label: 12 slices, 2 studies.
    assert report.metrics["n_test"] == 12 and report.metrics["n_test_studies"] == 2
    load_model(out, "cpu")
    result = evaluate(out, csv=csv_path, dicom_root=root, device="cpu")
    assert result["n_studies"] == 6 and result["n_studies_positive"] == 3
    assert result["n"] == 36 and 0.0 <= result["study_auc"] <= 1.0


def test_site_split_is_by_study_and_stratified() -> None:
    studies = [
        LabelledStudy(f"1.2.3.{i}", int(i < 8), np.zeros((2, 4, 4), np.float32)) for i in range(20)
    ]
    split = split_studies(studies, seed=0)
    uids = [[s.study_uid for s in split[k]] for k in ("train", "val", "test")]
    assert sum(map(len, uids)) == 20 and len(set().union(*map(set, uids))) == 20
    for part in ("val", "test"):
        assert {s.label for s in split[part]} == {0, 1}
    again = split_studies(studies, seed=0)  # seeded
    assert [[s.study_uid for s in again[k]] for k in ("train", "val", "test")] == uids


def test_label_csv_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("study_uid,label\n1.2.3,maybe\n")
    with pytest.raises(ValueError, match="not 0/1"):
        read_label_csv(bad)
    bad.write_text("uid,label\n1.2.3,1\n")
    with pytest.raises(ValueError, match="study_uid"):
        read_label_csv(bad)
    ok = tmp_path / "ok.csv"
    ok.write_text("study_uid,label\n1.2.3,true\n1.2.4,Negative\n")
    assert read_label_csv(ok) == {"1.2.3": 1, "1.2.4": 0}


def _write_cr(path: Path, pixels: np.ndarray, photometric: str) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CR"
    ds.PatientName, ds.PatientID = "Test^CR", "CR-1"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = ["1.6", "1.6"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_radiograph_reads_as_monochrome2(tmp_path: Path) -> None:
    img, _ = phantom_radiograph(2, 200, 180, (1.6, 1.6), lesion=False)
    _write_cr(tmp_path / "m2.dcm", img, "MONOCHROME2")
    _write_cr(tmp_path / "m1.dcm", 4095 - img.astype(np.int32), "MONOCHROME1")
    a, spacing = read_series([tmp_path / "m2.dcm"])
    b, _ = read_series([tmp_path / "m1.dcm"])
    assert a.shape == (1, 200, 180) and spacing[1:] == pytest.approx((1.6, 1.6))
    np.testing.assert_array_equal(a[0], img)
    # MONOCHROME1 comes back as MONOCHROME2 (GDCM inverts it): same image.
    np.testing.assert_allclose(b[0] - b[0].mean(), a[0] - a[0].mean(), atol=1e-3)
