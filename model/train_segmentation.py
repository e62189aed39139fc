"""Train the demonstration 3D lung-nodule segmentation network and write it as a MONAI bundle.

    python -m model.train_segmentation --out model/bundles/ct-nodule-seg --seed 0 --epochs 48

The network is MONAI's UNet (two output channels: 0 background, 1 nodule;
softmax over channels). Its training data are synthetic chest CT phantoms
(model/phantom.py) in MONAI's array convention, exactly what the bundle's
preprocessing gives for a DICOM CT: oriented RAS (index grows towards the
patient's Right, Anterior, Superior; from our LPS (z, y, x) arrays: flip y
and x, transpose to (x, y, z)), on a 2 mm isotropic grid (the phantoms are
drawn on it directly), HU -1000..500 scaled to [0, 1] and clipped. Random 64^3
patches, half of them centred near a nodule; DiceCE loss; Adam.

Reproducible: the seed fixes the phantoms, the patches and the initialisation,
and torch runs deterministic algorithms on `--threads` threads.
Held-out figures come from a shifted generator (model/segmentation_eval.py).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from model import segmentation_eval as ev
from model.phantom import phantom_nodule_mask, phantom_volume
from model.segmentation_bundle import write_bundle

log = logging.getLogger(__name__)

NETWORK_ARGS: dict[str, object] = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32, 64],
    "strides": [2, 2, 2], "num_res_units": 1,
}
PATCH = 64
TRAIN_SPLIT, VAL_SPLIT = 0, 1


@dataclass(frozen=True)
class Volume:
    """A training volume in the network's convention: (X, Y, Z) RAS, 2 mm."""

    image: np.ndarray  # float32 in [0, 1]
    mask: np.ndarray  # bool, the nodule


def network() -> UNet:
    return UNet(**NETWORK_ARGS)  # type: ignore[arg-type]


def scale_hu(hu: np.ndarray) -> np.ndarray:
    """ScaleIntensityRange(a_min=-1000, a_max=500, b_min=0, b_max=1, clip=True)."""
    lo, hi = ev.HU_RANGE
    return np.clip((hu.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def lps_to_ras(zyx: np.ndarray) -> np.ndarray:
    """An axial LPS (z, y, x) array as MONAI's RAS (x, y, z): flip y and x, transpose."""
    return np.ascontiguousarray(zyx[:, ::-1, ::-1].transpose(2, 1, 0))


def phantom_2mm(seed: int, split: int, index: int, lesion: bool) -> ev.Case:
    """A training-generator phantom on its own 2 mm grid (LPS), 160-200 mm wide and 80-160 deep."""
    geometry = np.random.default_rng(ev.case_seed(seed, split, index, 0))
    size = int(round(geometry.uniform(340.0, 400.0) / ev.PIXDIM))
    n_slices = int(geometry.integers(40, 81))
    spacing = (ev.PIXDIM,) * 3
    phantom = ev.case_seed(seed, split, index, 1)
    hu, _ = phantom_volume(phantom, n_slices, size, size, spacing, lesion=lesion)
    truth = (phantom_nodule_mask(phantom, n_slices, size, size, spacing) if lesion
             else np.zeros(hu.shape, dtype=bool))
    return ev.Case(hu, spacing, truth)


def training_volume(seed: int, index: int, lesion: bool) -> Volume:
    case = phantom_2mm(seed, TRAIN_SPLIT, index, lesion)
    image, mask = lps_to_ras(scale_hu(case.hu)), lps_to_ras(case.truth)
    # Up to one patch in every axis, half before and half after, with zero (air,
    # -1000 HU): what SlidingWindowInferer does to a short series. Padding only
    # after taught the network that tissue never starts at an air slab, and it
    # flagged whole slices of soft tissue at the start of short series.
    pad = [((PATCH - n) // 2, PATCH - n - (PATCH - n) // 2) if n < PATCH else (0, 0)
           for n in image.shape]
    return Volume(np.pad(image, pad), np.pad(mask, pad))


def sample_patch(vol: Volume, rng: np.random.Generator, near_nodule: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A PATCH^3 crop; near_nodule: the nodule inside it, up to 16 voxels off its centre."""
    shape = np.array(vol.image.shape)
    if near_nodule and vol.mask.any():
        voxels = np.argwhere(vol.mask)
        centre = voxels[rng.integers(len(voxels))] + rng.integers(-16, 17, 3)
        start = np.clip(centre - PATCH // 2, 0, shape - PATCH)
    else:
        start = np.array([rng.integers(0, n - PATCH + 1) for n in shape])
    sl = tuple(slice(int(s), int(s) + PATCH) for s in start)
    return vol.image[sl], vol.mask[sl]


def fit(net: torch.nn.Module, volumes: list[Volume], *, seed: int, iterations: int,
        batch_size: int, lr: float) -> list[float]:
    """Adam on DiceCE over random patches; returns the loss of every iteration."""
    rng = np.random.default_rng(ev.case_seed(seed, TRAIN_SPLIT, 0, 9))
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iterations, 1))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    with_nodule = [v for v in volumes if v.mask.any()]
    losses: list[float] = []
    net.train()
    for it in range(iterations):
        xs, ys = [], []
        for b in range(batch_size):
            # Half the patches at a nodule, else it is a needle in 260,000 voxels.
            near = b % 2 == 0 and bool(with_nodule)
            pool = with_nodule if near else volumes
            x, y = sample_patch(pool[rng.integers(len(pool))], rng, near)
            xs.append(x)
            ys.append(y)
        xb = torch.from_numpy(np.stack(xs)[:, None])
        yb = torch.from_numpy(np.stack(ys)[:, None].astype(np.float32))
        loss = loss_fn(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (it + 1) % 25 == 0:
            log.info("iteration %d/%d: loss %.4f", it + 1, iterations, np.mean(losses[-25:]))
    net.eval()
    return losses


def evaluate_clean(net: torch.nn.Module, seed: int, n_positive: int, n_negative: int
                   ) -> dict[str, object]:
    """The training generator's own kind of volume, unseen (validation split): the clean case."""
    scores = []
    with torch.no_grad():
        for index in range(n_positive + n_negative):
            case = phantom_2mm(seed, VAL_SPLIT, index, lesion=index < n_positive)
            scores.append(ev.score(ev.predict_case(net, case), case.truth))
    return ev.summarise(scores)


def train(out: Path, *, seed: int = 0, epochs: int = 48, iterations_per_epoch: int = 25,
          n_volumes: int = 32, batch_size: int = 2, lr: float = 3e-3, n_test: int = 20,
          n_clean: int = 6, threads: int = 2) -> dict[str, object]:
    """Train and write the bundle to `out`; returns the metrics written to its metadata.

    `epochs` x `iterations_per_epoch` optimiser steps of `batch_size` patches
    from `n_volumes` phantoms (three in four with a nodule); `n_test` shifted
    volumes with a nodule and as many without; `n_clean` of each from the
    training generator.
    """
    t0 = time.monotonic()
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        torch.manual_seed(seed)
        volumes = [training_volume(seed, i, lesion=i % 4 != 3) for i in range(n_volumes)]
        net = network()
        losses = fit(net, volumes, seed=seed, iterations=epochs * iterations_per_epoch,
                     batch_size=batch_size, lr=lr)
        train_s = time.monotonic() - t0
        metrics = {"shifted": ev.evaluate(net, seed, n_test, n_test),
                   "clean": evaluate_clean(net, seed, n_clean, n_clean)}
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)
    training: dict[str, object] = {
        "seed": seed, "epochs": epochs, "iterations_per_epoch": iterations_per_epoch,
        "batch_size": batch_size, "patch": [PATCH] * 3, "n_volumes": n_volumes,
        "learning_rate": lr, "optimizer": "Adam", "loss": "DiceCELoss(to_onehot_y, softmax)",
        "final_loss": round(float(np.mean(losses[-25:])), 4) if losses else None,
        "threads": threads, "training_seconds": round(train_s, 1),
        "seconds": round(time.monotonic() - t0, 1),
    }
    write_bundle(out, net, NETWORK_ARGS, metrics, training)
    log.info("bundle written to %s in %.0f s", out, time.monotonic() - t0)
    return {"metrics": metrics, "training": training}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the bundle folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=48)
    p.add_argument("--iterations-per-epoch", type=int, default=25)
    p.add_argument("--volumes", type=int, default=32, help="training phantoms")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--test", type=int, default=20, help="shifted test volumes of each kind")
    p.add_argument("--clean", type=int, default=6, help="clean test volumes of each kind")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(a.out, seed=a.seed, epochs=a.epochs, iterations_per_epoch=a.iterations_per_epoch,
          n_volumes=a.volumes, batch_size=a.batch_size, lr=a.lr, n_test=a.test,
          n_clean=a.clean, threads=a.threads)


if __name__ == "__main__":
    main()
