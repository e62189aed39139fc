"""Projection studies: every image analysed, findings per side, with the views they are on.

A screening mammogram's four views (CC and MLO of each breast) go to a
detector whose evidence is the brightest spot: the right breast holds a
bright mass on both its views, the left none. The study gets one finding
per breast, the right present on R CC and R MLO, the left absent; the SR
states each side as TID 1500 does (a Laterality modifier of the finding
site), with its own tracking UID, and passes dciodvfy and PixelMed. A
two-view chest radiograph goes to the built-in CR model: both images are
analysed, and the one finding names the view it rests on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid
from sqlalchemy import select
from torch import nn

from daemon.stages.report import Reporter
from db import migrate
from db.models import FindingRecord
from db.reviews import load_result
from db.session import Database
from dicom_io.series import choose_series
from dicom_io.sr import read_findings
from dicom_io.synthetic import write_projection
from model.analysis import analyse_study
from model.datasets import sample_seed, synthetic_cr_image
from model.manifest import MANIFEST_NAME, ModelManifest
from model.registry import builtin_model_dir, load_model, sha256_bytes
from model.results import Outcome
from tests import reportdata as rd
from tests.dicom_validate import dciodvfy_errors, pixelmed_sr_errors
from tests.test_report_stage import make_config


class _BrightestSpot(nn.Module):
    """Logit 20 x (brightest pixel - 0.5); the image itself as its class-activation map."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 20.0 * (x.amax(dim=(2, 3)) - 0.5), x


def _mass_detector(folder: Path) -> Path:
    folder.mkdir()
    torch.jit.script(_BrightestSpot()).save(str(folder / "model.ts"))
    ModelManifest.model_validate({
        "name": "mass-test", "version": "1", "intended_use": "A test of projection grouping.",
        "applies_to": {"modalities": ["MG"]}, "threshold": 0.5,
        "input": {"size": [64, 64], "denoise": "none", "contrast": "window",
                  "window": [2000.0, 4000.0]},
        "labels": [{"name": "mass",
                    "finding": {"value": "4147007", "scheme": "SCT", "meaning": "Mass"},
                    "site": {"value": "76752008", "scheme": "SCT", "meaning": "Breast"}}],
        "weights": {"file": "model.ts", "format": "torchscript", "outputs": ["logits", "cam"],
                    "sha256": sha256_bytes((folder / "model.ts").read_bytes())},
    }).write(folder / MANIFEST_NAME)  # fmt: skip
    return folder


def _breast(mass: bool) -> np.ndarray:
    yy, xx = np.mgrid[0:256, 0:200]
    image = np.where(((yy - 128) / 120.0) ** 2 + (xx / 180.0) ** 2 < 1.0, 1000.0, 100.0)
    if mass:
        image[((yy - 100) ** 2 + (xx - 60) ** 2) < 64] = 3400.0
    return image


@pytest.fixture
def mammogram(tmp_path: Path) -> list[Path]:
    study, series = generate_uid(), generate_uid()
    views = [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]
    return [write_projection(_breast(side == "R"), tmp_path / "mg" / f"{side}{view}.dcm",
                             modality="MG", view=view, laterality=side, study_uid=study,
                             series_uid=series, instance_number=i + 1)
            for i, (side, view) in enumerate(views)]  # fmt: skip


def test_a_four_view_mammogram_gets_one_finding_per_breast(
    mammogram: list[Path], tmp_path: Path
) -> None:
    model = load_model(_mass_detector(tmp_path / "model"), "cpu")
    images = choose_series(mammogram)
    assert len(images) == 4  # one entry per view
    [result] = analyse_study(images, [model])
    assert result.outcome == Outcome.ANALYSED
    right, left = result.findings
    assert (right.laterality, right.present, right.views) == ("R", True, ("R CC", "R MLO"))
    assert (left.laterality, left.present, left.views) == ("L", False, ())
    headers = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID:
               pydicom.dcmread(p, stop_before_pixels=True) for p in mammogram}  # fmt: skip
    for finding in (right, left):
        assert finding.location is not None
        key = headers[finding.location.sop_instance_uid]
        assert key.ImageLaterality == finding.laterality
        assert finding.view == f"{key.ImageLaterality} {key.ViewPosition}"
    # The right breast's mass: the located point lies on it (centre column 60, row 100).
    assert right.location is not None
    assert abs(right.location.point[0] - 60.5) <= 8 and abs(right.location.point[1] - 100.5) <= 8
    [step] = [p for p in result.provenance if p["name"] == "projections"]
    assert [i["view"] for i in step["parameters"]["images"]] == ["R CC", "L CC", "R MLO", "L MLO"]


def test_the_sides_reach_the_sr_and_the_review_page(
    mammogram: list[Path], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'report.db'}"
    migrate.upgrade(url)
    config = make_config(tmp_path, url)
    db = Database(config.database_url)
    study_uid = rd.receive(db, config.storage.spool_dir, mammogram)
    model = load_model(_mass_detector(tmp_path / "model"), "cpu")
    results = analyse_study(choose_series(mammogram), [model])
    rd.record_analysis(db, config.storage.state_dir, study_uid, results)
    assert Reporter(db, config).run_once() == 1

    with db.session() as s:
        records = list(s.scalars(select(FindingRecord).order_by(FindingRecord.id)))
        assert [(f.laterality, f.views) for f in records] == [("R", ["R CC", "R MLO"]),
                                                             ("L", None)]  # fmt: skip
        view = load_result(s, records[0].run_id)
    assert view is not None
    assert [f.site for f in view.findings] == ["Breast, right (R CC, R MLO)", "Breast, left (L CC)"]
    srs = [p for p in config.storage.state_dir.rglob("*.dcm")
           if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR"]  # fmt: skip
    assert len(srs) == 1
    read = read_findings(pydicom.dcmread(srs[0]))
    assert [(f["laterality"], f["present"]) for f in read] == [("R", True), ("L", False)]
    assert len({f["tracking_uid"] for f in read}) == 2
    assert "on R CC, R MLO" in str(read[0]["comment"])
    assert dciodvfy_errors(srs[0]) == [] and pixelmed_sr_errors(srs[0]) == []


def test_a_two_view_chest_radiograph_is_read_on_both_views(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    files = []
    for i, (view, lesion) in enumerate([("PA", True), ("LL", False)]):
        image, spacing, _ = synthetic_cr_image(sample_seed(5, "test", i), lesion)
        files.append(write_projection(image, tmp_path / f"{view}.dcm", view=view,
                                      spacing=spacing, study_uid=study, series_uid=series,
                                      instance_number=i + 1))  # fmt: skip
    model = load_model(builtin_model_dir("cr-nodule"), "cpu")
    [result] = analyse_study(choose_series(files), [model])
    assert result.outcome == Outcome.ANALYSED
    [finding] = result.findings
    [step] = [p for p in result.provenance if p["name"] == "projections"]
    images = step["parameters"]["images"]
    assert [i["view"] for i in images] == ["PA", "LL"]  # both analysed
    best = max(images, key=lambda i: i["probabilities"]["nodule"])
    assert finding.view == best["view"] and finding.laterality is None
    assert abs(finding.probability - best["probabilities"]["nodule"]) < 1e-4


@pytest.mark.parametrize(("modality", "view", "side"),
                         [("MG", "MLO", "L"), ("CR", "PA", None), ("DX", "LL", None)])
def test_the_synthetic_radiographs_are_valid_dicom(
    tmp_path: Path, modality: str, view: str, side: str | None
) -> None:
    path = write_projection(_breast(False), tmp_path / "x.dcm", modality=modality, view=view,
                            laterality=side, study_uid=generate_uid(), series_uid=generate_uid())
    assert dciodvfy_errors(path) == []
