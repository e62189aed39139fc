"""Prediction on preprocessed slices: shapes, batching, OOM fallback, Grad-CAM, aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from model.datasets import sample_seed, synthetic_cr_sample, synthetic_ct_sample
from model.inference import aggregate_study, forward_logits, predict
from model.registry import LoadedModel, builtin_model_dir, load_model
from model.runtimes import TorchRuntime


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model(builtin_model_dir(), "cpu")


@pytest.fixture(scope="module")
def samples(model: LoadedModel) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float] | None]]:
    """Eight positive and eight negative slices the model never saw (a fresh seed)."""
    xs, ys, centers = [], [], []
    for i in range(16):
        x, c = synthetic_ct_sample(sample_seed(12345, "test", i), i < 8, model.manifest.input)
        xs.append(x)
        ys.append(i < 8)
        centers.append(c)
    return np.stack(xs), np.array(ys), centers


def test_predict_shapes_and_ranges(model: LoadedModel, samples: tuple) -> None:
    x, _, _ = samples
    pred = model.predict(x, batch_size=5, saliency_top_k=3)
    assert pred.probabilities.shape == (16, 1) and pred.probabilities.dtype == np.float32
    assert ((pred.probabilities >= 0) & (pred.probabilities <= 1)).all()
    assert pred.saliency is not None
    assert pred.saliency.shape == (16, 128, 128) and pred.saliency.dtype == np.float32
    assert pred.saliency.min() >= 0.0 and pred.saliency.max() <= 1.0
    # Grad-CAM only on the 3 most suspicious slices, each peaking at its probability.
    top = np.argsort(-pred.probabilities[:, 0], kind="stable")[:3]
    explained = np.nonzero(pred.saliency.reshape(16, -1).max(axis=1) > 0)[0]
    assert set(explained) <= set(top)
    for i in top:
        assert pred.saliency[i].max() == pytest.approx(pred.probabilities[i, 0], abs=1e-5)
    # (n, 1, h, w) is accepted as well, and batch size does not change the result.
    again = model.predict(x[:, None], batch_size=16, with_saliency=False)
    assert again.saliency is None
    np.testing.assert_allclose(again.probabilities, pred.probabilities, atol=1e-5)


def test_model_separates_fresh_phantoms(model: LoadedModel, samples: tuple) -> None:
    x, y, _ = samples
    p = model.predict(x, with_saliency=False).probabilities[:, 0]
    assert p[y].mean() > 0.7 and p[~y].mean() < 0.3


def test_saliency_peaks_at_the_nodule(model: LoadedModel, samples: tuple) -> None:
    x, y, centers = samples
    pred = model.predict(x[y], saliency_top_k=8)
    assert pred.saliency is not None
    distances = []
    positives = [c for c, pos in zip(centers, y, strict=True) if pos]
    for sal, center in zip(pred.saliency, positives, strict=True):
        peak = np.unravel_index(np.argmax(sal), sal.shape)
        distances.append(float(np.hypot(peak[0] - center[0], peak[1] - center[1])))
    # 128 px span ~360 mm, so 10 px is ~3 cm: the right spot of the right lung.
    assert np.median(distances) < 8.0
    assert sum(d < 12.0 for d in distances) >= 6


def test_wrong_input_is_refused(model: LoadedModel) -> None:
    with pytest.raises(ValueError, match="do not match"):
        model.predict(np.zeros((2, 64, 64), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        model.predict(np.full((1, 128, 128), np.nan, np.float32))
    empty = model.predict(np.zeros((0, 128, 128), np.float32))
    assert empty.probabilities.shape == (0, 1)
    assert empty.saliency is not None and empty.saliency.shape == (0, 128, 128)


class _OomAbove(nn.Module):
    """Raises CUDA out-of-memory for batches larger than `limit`, as a full GPU would."""

    def __init__(self, inner: nn.Module, limit: int) -> None:
        super().__init__()
        self.inner, self.limit, self.sizes = inner, limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x)


def test_out_of_memory_halves_the_batch(model: LoadedModel, samples: tuple) -> None:
    x = samples[0][:, None]
    expected = forward_logits(model.runtime, x, batch_size=16)
    flaky = _OomAbove(model.network, limit=3)
    got = forward_logits(TorchRuntime(flaky, model.device), x, batch_size=16)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert flaky.sizes[:3] == [16, 8, 4] and set(flaky.sizes[3:]) <= {2}
    with pytest.raises(torch.cuda.OutOfMemoryError):
        forward_logits(TorchRuntime(_OomAbove(model.network, limit=0), model.device), x,
                       batch_size=4)


def test_out_of_memory_in_grad_cam_halves_the_batch_too(model: LoadedModel, samples: tuple) -> None:
    x = samples[0][:8]
    spec = model.manifest.input
    kwargs = {
        "channels": spec.channels,
        "size": spec.size,
        "n_labels": len(model.manifest.labels),
        "batch_size": 8,
        "saliency_top_k": 8,
    }
    # The same wrapper without a limit: Grad-CAM then explains the same layer.
    expected = predict(TorchRuntime(_OomAbove(model.network, limit=1000), model.device), x,
                       **kwargs)
    flaky = _OomAbove(model.network, limit=2)
    got = predict(TorchRuntime(flaky, model.device), x, **kwargs)
    assert expected.saliency is not None and got.saliency is not None
    np.testing.assert_allclose(got.probabilities, expected.probabilities, atol=1e-5)
    np.testing.assert_allclose(got.saliency, expected.saliency, atol=1e-4)
    assert max(flaky.sizes[-4:]) <= 2  # Grad-CAM ran in the reduced batches


def test_aggregate_study() -> None:
    p = np.array([[0.1, 0.5], [0.9, 0.2], [0.3, 0.4], [0.2, 0.1]], np.float32)
    np.testing.assert_allclose(aggregate_study(p), [0.9, 0.5])
    np.testing.assert_allclose(aggregate_study(p, "top_k_mean", k=2), [0.6, 0.45])
    np.testing.assert_allclose(aggregate_study(p[:1], "top_k_mean", k=3), [0.1, 0.5])
    with pytest.raises(ValueError):
        aggregate_study(np.zeros((0, 1)))


def test_saliency_works_inside_an_outer_inference_mode(model: LoadedModel, samples: tuple) -> None:
    x = samples[0][:2]
    with torch.inference_mode():  # a caller's context must not break Grad-CAM
        pred = model.predict(x, saliency_top_k=2)
    assert pred.saliency is not None and (pred.saliency.reshape(2, -1).max(axis=1) > 0).all()


def test_radiograph_model_finds_and_locates_nodules() -> None:
    cr = load_model(builtin_model_dir("cr-nodule"), "cpu")
    xs, centers = [], []
    for i in range(8):
        x, c = synthetic_cr_sample(sample_seed(777, "test", i), i < 4, cr.manifest.input)
        xs.append(x)
        centers.append(c)
    pred = cr.predict(np.stack(xs), saliency_top_k=4)
    p = pred.probabilities[:, 0]
    assert p[:4].min() > p[4:].max()  # fresh images, ranked right
    assert pred.saliency is not None
    for sal, (r, c) in zip(pred.saliency[:4], centers[:4], strict=True):
        peak = np.unravel_index(np.argmax(sal), sal.shape)
        assert np.hypot(peak[0] - r, peak[1] - c) < 10.0
