"""Study-level figures with intervals: the numbers `model evaluate` and the web page show."""

from __future__ import annotations

import numpy as np
import pytest

from model.evaluation import StudyEvaluation, delong_auc, evaluate_studies
from model.manifest import MANIFEST_NAME, ModelManifest
from model.registry import builtin_model_dir
from model.train import roc_auc


def test_delong_interval_matches_its_definition_and_narrows_with_more_studies() -> None:
    rng = np.random.default_rng(4)
    widths = []
    for n in (20, 80, 320):
        y = np.r_[np.ones(n), np.zeros(n)]
        s = np.r_[rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.0, n)]
        auc, low, high = delong_auc(y, s)
        assert auc == pytest.approx(roc_auc(y, s))
        assert 0.0 < low < auc < high < 1.0
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # A small hand-computed case: positives 0.9, 0.4; negatives 0.5, 0.1.
    # psi = [[1, 1], [0, 1]]: AUC 3/4; V10 = (1, 1/2), V01 = (1/2, 1);
    # var = var(V10)/2 + var(V01)/2 = 1/8/2 + 1/8/2 = 1/8.
    auc, low, high = delong_auc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1])
    half = 1.959964 * np.sqrt(1 / 8) / (0.75 * 0.25)
    assert auc == 0.75
    assert low == pytest.approx(1 / (1 + np.exp(-(np.log(3) - half))))
    assert high == pytest.approx(1 / (1 + np.exp(-(np.log(3) + half))))


def test_perfect_separation_still_has_an_honest_interval() -> None:
    auc, low, high = delong_auc([1] * 20 + [0] * 20, list(range(40, 20, -1)) + list(range(20)))
    assert auc == 1.0 and high == 1.0
    assert 0.8 < low < 0.9  # Wilson for 20/20: 0.84


def test_evaluation_counts_subgroups_and_reads_back_from_the_manifest(tmp_path) -> None:
    y = [1] * 20 + [0] * 20
    p = [0.9] * 17 + [0.2] * 3 + [0.1] * 19 + [0.7]
    small = [False] * 16 + [True] * 4 + [False] * 20
    e = evaluate_studies(y, p, 0.5, "shifted test", {"4-8 mm": small})
    assert (e.sensitivity, e.specificity) == (0.85, 0.95)
    assert e.sensitivity_low == pytest.approx(0.64, abs=0.01)
    assert e.subgroups["4-8 mm"].positives == 4 and e.subgroups["4-8 mm"].detected == 1
    said = dict(e.lines())
    assert said["Sensitivity"] == "0.85 (17/20; 95 % CI 0.64-0.95)"
    assert said["Sensitivity, 4-8 mm"].startswith("0.25 (1/4;")
    assert "Brier" in said["Calibration"] and said["AUC"].startswith("0.9")
    manifest = ModelManifest.from_file(builtin_model_dir() / MANIFEST_NAME)
    manifest.model_copy(update={"evaluation": e}).write(tmp_path / MANIFEST_NAME)
    again = ModelManifest.from_file(tmp_path / MANIFEST_NAME).evaluation
    assert isinstance(again, StudyEvaluation) and again == e
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        evaluate_studies([1, 0], [1.5, 0.1], 0.5, "bad")
