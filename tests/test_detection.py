"""Detection models: several lesions per study, each with its box, score and diameter.

The detector here boxes each slice's brightest spot (a 9-pixel square about
it) and scores it by its brightness. A CT holds two bright lesions, each over
three slices: the study gets two findings, numbered by score, each one box
grouped over its slices and located on its own images, with its diameter in
mm. The SR has a group per lesion (its own tracking UID, region and
Diameter), valid for dciodvfy and PixelMed; a CT with no lesion gets one
absent finding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from torch import nn

from dicom_io.series import load_series
from dicom_io.sr import read_findings
from dicom_io.sr.ai_result import build_ai_result_sr
from dicom_io.synthetic import write_ct_series
from model.analysis import analyse_study
from model.manifest import MANIFEST_NAME, ModelManifest
from model.registry import LoadedModel, load_model, sha256_bytes
from model.results import Outcome
from tests.dicom_validate import dciodvfy_errors, pixelmed_sr_errors

SPACING = (2.5, 2.0, 2.0)  # 64 x 64 over 128 mm: one network pixel is one source pixel


class _BrightestSpot(nn.Module):
    """(n, 1, 6): a 9x9 box about each slice's brightest pixel, logit 20 x (value - 0.5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, w = x.shape[0], x.shape[3]
        peak, where = x[:, 0].reshape(n, -1).max(dim=1)
        row = torch.div(where, w, rounding_mode="floor").float()
        col = (where % w).float()
        box = torch.stack([col - 4, row - 4, col + 5, row + 5, 20.0 * (peak - 0.5),
                           torch.zeros_like(peak)], dim=1)  # fmt: skip
        return box[:, None, :]


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = tmp_path_factory.mktemp("detector")
    torch.jit.script(_BrightestSpot()).save(str(folder / "model.ts"))
    ModelManifest.model_validate({
        "name": "lesion-test", "version": "1", "kind": "detection", "max_findings": 3,
        "intended_use": "A test of lesion grouping.", "applies_to": {"modalities": ["CT"]},
        "input": {"size": [64, 64], "denoise": "none", "contrast": "window",
                  "window": [400.0, 1000.0]},
        "threshold": 0.5,
        "labels": [{"name": "lesion",
                    "finding": {"value": "52988006", "scheme": "SCT", "meaning": "Lesion"},
                    "site": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"}}],
        "weights": {"file": "model.ts", "format": "torchscript", "outputs": ["detections"],
                    "sha256": sha256_bytes((folder / "model.ts").read_bytes())},
    }).write(folder / MANIFEST_NAME)  # fmt: skip
    return load_model(folder, "cpu")


def _ct(folder: Path, lesions: list[tuple[range, int, int, float]]) -> list[Path]:
    volume = np.zeros((20, 64, 64))
    for slices, row, col, hu in lesions:
        for k in slices:
            volume[k, row - 2:row + 3, col - 2:col + 3] = hu
    return write_ct_series(volume, folder, spacing=SPACING)


def test_two_lesions_are_two_findings_each_on_its_own_images(
    detector: LoadedModel, tmp_path: Path
) -> None:
    # The brighter one (600 HU) on slices 12-14, the other (500 HU) on slices 3-5.
    files = _ct(tmp_path / "ct", [(range(3, 6), 20, 44, 500.0), (range(12, 15), 40, 16, 600.0)])
    series = load_series(files)
    [result] = analyse_study([series], [detector])
    assert result.outcome == Outcome.ANALYSED
    first, second = result.findings
    assert (first.lesion, second.lesion) == (1, 2) and first.present and second.present
    assert first.probability > second.probability
    headers = {h.SOPInstanceUID: h for h in series.headers}
    for finding, (slices, row, col) in ((first, (range(12, 15), 40, 16)),
                                        (second, (range(3, 6), 20, 44))):  # fmt: skip
        assert finding.location is not None and finding.location.box is not None
        k = series.sop_instance_uids.index(finding.location.sop_instance_uid)
        assert k in slices
        # The box about the spot's brightest pixel: 9 pixels, the spot inside it.
        c0, r0, c1, r1 = finding.location.box
        assert c0 <= col - 2 + 0.5 and col + 2 + 0.5 <= c1 and r0 <= row - 2 + 0.5
        assert c1 - c0 == pytest.approx(9.0, abs=0.01) and r1 - r0 == pytest.approx(9, abs=0.01)
        assert finding.diameter_mm == pytest.approx(18.0, abs=0.05)  # 9 pixels of 2 mm
        assert finding.location.sop_instance_uid in headers
    [step] = [p for p in result.provenance if p["name"] == "detection"]
    assert step["parameters"]["lesions"] >= 2  # every slice has a box; the spots are two
    assert result.saliency is not None

    sr = build_ai_result_sr(result, series.headers, series_number=901)
    sr.save_as(tmp_path / "sr.dcm")
    read = read_findings(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert len(read) == 2 and len({f["tracking_uid"] for f in read}) == 2
    assert [f["present"] for f in read] == [True, True]
    assert "Lesion 1 present, 18 mm" in str(read[0]["comment"])
    diameters = [item for group in pydicom.dcmread(tmp_path / "sr.dcm").ContentSequence
                 for item in _walk(group) if _name(item) == "81827009"]  # fmt: skip
    assert [float(d.MeasuredValueSequence[0].NumericValue) for d in diameters] == [18.0, 18.0]
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    assert pixelmed_sr_errors(tmp_path / "sr.dcm") == []


def test_a_study_without_lesions_has_one_absent_finding(
    detector: LoadedModel, tmp_path: Path
) -> None:
    [result] = analyse_study([load_series(_ct(tmp_path / "ct", []))], [detector])
    [finding] = result.findings
    assert not finding.present and finding.lesion is None


def _walk(item: pydicom.Dataset) -> list[pydicom.Dataset]:
    out = [item]
    for child in item.get("ContentSequence", []):
        out.extend(_walk(child))
    return out


def _name(item: pydicom.Dataset) -> str:
    names = item.get("ConceptNameCodeSequence")
    return str(names[0].CodeValue) if names else ""


def test_the_lesions_reach_the_database_the_sr_and_the_review_page(
    detector: LoadedModel, tmp_path: Path
) -> None:
    from sqlalchemy import select

    from daemon.stages.report import Reporter
    from db import migrate
    from db.models import FindingRecord
    from db.reviews import load_result
    from db.session import Database
    from tests import reportdata as rd
    from tests.test_report_stage import make_config

    url = f"sqlite:///{tmp_path / 'report.db'}"
    migrate.upgrade(url)
    config = make_config(tmp_path, url)
    db = Database(config.database_url)
    files = _ct(tmp_path / "ct", [(range(3, 6), 20, 44, 500.0), (range(12, 15), 40, 16, 600.0)])
    study_uid = rd.receive(db, config.storage.spool_dir, files)
    rd.record_analysis(db, config.storage.state_dir, study_uid,
                       analyse_study([load_series(files)], [detector]))  # fmt: skip
    assert Reporter(db, config).run_once() == 1
    with db.session() as s:
        records = list(s.scalars(select(FindingRecord).order_by(FindingRecord.id)))
        assert [(f.lesion, f.diameter_mm) for f in records] == [(1, 18.0), (2, 18.0)]
        assert len({f.tracking_uid for f in records}) == 2
        view = load_result(s, records[0].run_id)
    assert view is not None
    assert [f.site for f in view.findings] == ["Lung, lesion 1, 18 mm", "Lung, lesion 2, 18 mm"]
    srs = [p for p in config.storage.state_dir.rglob("*.dcm")
           if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR"]  # fmt: skip
    assert len(srs) == 1
    assert [f["tracking_uid"] for f in read_findings(pydicom.dcmread(srs[0]))] == [
        f.tracking_uid for f in records]


def test_the_workers_analyser_runs_a_detector(detector: LoadedModel, tmp_path: Path) -> None:
    """What `secondreader serve` runs: the configured models behind the worker's batch size."""
    from daemon.stages.analyse.analyser import ModelAnalyser

    files = _ct(tmp_path / "ct", [(range(3, 6), 20, 44, 500.0)])
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    [result] = ModelAnalyser([detector.folder], device="cpu").analyse(study, {"s": files})
    assert result.outcome == Outcome.ANALYSED, result.reason
    assert [f.lesion for f in result.findings] == [1]
