"""Write the trained 3D nodule segmentation network as a MONAI bundle folder.

Layout (MONAI bundle spec): models/model.ts (TorchScript), configs/metadata.json,
configs/inference.json (literal keys only: no `$` expressions, `%` macros or
`@` references, so that reading it never executes anything), docs/README.md;
and beside the configs codes.toml, what `secondreader model import-bundle
PATH --manifest codes.toml` needs that a bundle cannot say (SNOMED CT codes,
applicability).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import monai
import numpy as np
import tomli_w
import torch

from model import segmentation_eval as ev

NAME = "ct_nodule_seg_3d"
VERSION = "0.1.0"
INTENDED_USE = (
    "Demonstration only: trained on synthetic chest CT phantoms, never on patient data. "
    "NOT FOR CLINICAL USE. Segments solid lung nodules of about 8-20 mm in diameter in "
    "chest CT; smaller nodules, subsolid or juxtapleural ones and real scans were never seen."
)
COMMAND = "python -m model.train_segmentation --out model/bundles/ct-nodule-seg --seed {seed} " \
          "--epochs {epochs}"


def inference_config(network_args: dict[str, object]) -> dict[str, Any]:
    """configs/inference.json: the network and MONAI's transforms, as literal keys."""
    return {
        "image_key": "image",
        "network_def": {"_target_": "monai.networks.nets.UNet", **network_args},
        "preprocessing": {"_target_": "monai.transforms.Compose", "transforms": [
            {"_target_": "monai.transforms.LoadImaged", "keys": "image"},
            {"_target_": "monai.transforms.EnsureChannelFirstd", "keys": "image"},
            {"_target_": "monai.transforms.Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "monai.transforms.Spacingd", "keys": "image",
             "pixdim": [ev.PIXDIM] * 3, "mode": "bilinear"},
            {"_target_": "monai.transforms.ScaleIntensityRanged", "keys": "image",
             "a_min": int(ev.HU_RANGE[0]), "a_max": int(ev.HU_RANGE[1]), "b_min": 0.0,
             "b_max": 1.0, "clip": True},
        ]},
        "inferer": {"_target_": "monai.inferers.SlidingWindowInferer",
                    "roi_size": list(ev.ROI), "sw_batch_size": 4, "overlap": 0.25,
                    "mode": "gaussian"},
        "postprocessing": {"_target_": "monai.transforms.Compose", "transforms": [
            {"_target_": "monai.transforms.Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "monai.transforms.AsDiscreted", "keys": "pred", "argmax": True},
        ]},
    }


def _tensor_format(fmt: str, channels: dict[str, str]) -> dict[str, Any]:
    return {"type": "image", "format": fmt, "num_channels": len(channels),
            "spatial_shape": list(ev.ROI), "dtype": "float32", "value_range": [0, 1],
            "is_patch_data": True, "channel_def": channels}


def metadata(metrics: dict[str, object], training: dict[str, object]) -> dict[str, Any]:
    """configs/metadata.json."""
    inputs = _tensor_format("hounsfield", {"0": "image"}) | {"modality": "CT"}
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
                  "0.8.1/meta_schema_20220324.json",
        "version": VERSION,
        "changelog": {VERSION: "first version: trained on synthetic phantoms"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "optional_packages_version": {},
        "required_packages_version": {},
        "name": NAME,
        "task": "Lung nodule segmentation in chest CT (3D)",
        "description": "A small 3D UNet that segments solid lung nodules in chest CT, on a 2 mm "
                       "RAS grid, trained on synthetic phantoms (secondreader model/phantom.py).",
        "authors": "secondreader",
        "copyright": "Apache-2.0",
        "intended_use": INTENDED_USE,
        "data_source": "Synthetic chest CT phantoms generated on the fly; no patient data.",
        "data_type": "dicom",
        "image_classes": "single channel CT, Hounsfield units scaled from -1000..500 to 0..1",
        "label_classes": "0 background, 1 nodule",
        "pred_classes": "0 background, 1 nodule (argmax of the softmax)",
        "eval_metrics": metrics,
        "training": training,
        "references": [],
        "network_data_format": {
            "inputs": {"image": inputs},
            "outputs": {"pred": _tensor_format("segmentation",
                                               {"0": "background", "1": "nodule"})},
        },
    }


def codes() -> dict[str, Any]:
    """codes.toml: for `secondreader model import-bundle PATH --manifest codes.toml`."""
    return {
        "name": "secondreader-demo-nodule-ct-seg",
        "version": VERSION,
        "intended_use": INTENDED_USE,
        "applies_to": {"modalities": ["CT"], "body_parts": ["CHEST", "LUNG", "THORAX"],
                       "min_slices": 16},
        "labels": [{"name": "nodule",
                    "finding": {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"},
                    "site": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"}}],
    }


def _iv(d: object) -> str:
    if not isinstance(d, dict) or d.get("estimate") is None:
        return "n/a"
    return (f"{d['estimate']:.0%} ({d['low']:.0%}-{d['high']:.0%}; "
            f"{d['numerator']:g}/{d['denominator']:g})")


def _results(title: str, m: dict[str, object]) -> str:
    return "\n".join([
        f"**{title}**: {m['n_volumes_with_nodule']} volumes with a nodule, "
        f"{m['n_volumes_without_nodule']} without.",
        "",
        f"- Dice per volume with a nodule: mean {m['dice_mean']}, median {m['dice_median']}, "
        f"min {m['dice_min']}; Dice above 0.5: {_iv(m['dice_above_0_5'])}",
        f"- lesion-level sensitivity: {_iv(m['lesion_sensitivity'])}",
        f"- false positives per volume: {m['false_positives_per_volume']}; volumes free of "
        f"false positives: {_iv(m['volumes_free_of_false_positives'])}",
        "",
    ])


def readme(metrics: dict[str, Any], training: dict[str, object]) -> str:
    """docs/README.md."""
    sz, sy, sx = ev.SHIFTED_SPACING
    return "\n".join([
        f"# {NAME} {VERSION}: 3D lung nodule segmentation (demonstration)",
        "",
        "**NOT FOR CLINICAL USE.** " + INTENDED_USE,
        "",
        "## What it is",
        "",
        "MONAI's `UNet` (3D, channels 8-16-32-64, strides 2-2-2, one residual unit), two "
        "output channels (0 background, 1 nodule; softmax over channels), as TorchScript "
        "(`models/model.ts`). Input (N, 1, X, Y, Z) float32, output (N, 2, X, Y, Z) logits. "
        "`configs/inference.json` is the pipeline: LoadImage, EnsureChannelFirst, "
        "Orientation RAS, Spacing 2 mm (bilinear), ScaleIntensityRange -1000..500 HU to 0..1 "
        "(clipped), sliding window 64^3 (overlap 0.25, Gaussian), softmax, argmax.",
        "",
        "## How it was made",
        "",
        f"    {COMMAND.format(**training)}",
        "",
        f"{training.get('n_volumes')} synthetic chest CT phantoms drawn on a 2 mm grid in "
        "MONAI's RAS (x, y, z) convention (three in four with a nodule), random 64^3 patches, "
        "half centred near a nodule, DiceCE loss, Adam with a cosine schedule, "
        f"{training.get('epochs')} x {training.get('iterations_per_epoch')} iterations of "
        f"{training.get('batch_size')} patches, seed {training.get('seed')}, "
        f"{training.get('threads')} CPU threads ({training.get('training_seconds')} s).",
        "",
        "## Held-out results (95 % Wilson intervals)",
        "",
        f"Shifted generator: {sz:g} mm slices and {sy:g} mm pixels (training: 2 mm isotropic), "
        f"{ev.SHIFTED_EXTRA_NOISE_HU:g} HU more Gaussian noise than any training phantom; "
        "resampled to 2 mm by MONAI's Spacing as in deployment, the label map resampled back "
        "(nearest neighbour) onto the source grid and compared there with the phantom's true "
        "nodule. A lesion is found when a predicted connected component (26-connected) "
        "overlaps it; any other component is a false positive.",
        "",
        _results("Shifted generator", metrics["shifted"]),
        _results("Training generator, unseen volumes", metrics["clean"]),
        "## Limits",
        "",
        "- Synthetic phantoms only: one solid, roughly spherical nodule of 8-20 mm per volume, "
        "idealised anatomy and noise. Nothing is known of its behaviour on real CT.",
        "- No post-processing beyond argmax: small spurious components count as findings.",
        "- Small test sets: read the intervals, not the point estimates.",
        "",
    ])


def write_bundle(out: Path, net: torch.nn.Module, network_args: dict[str, object],
                 metrics: dict[str, Any], training: dict[str, object]) -> None:
    """The bundle folder at `out` (created or overwritten)."""
    for sub in ("models", "configs", "docs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    net = net.cpu().eval()
    scripted = torch.jit.script(net)
    torch.jit.save(scripted, str(out / "models" / "model.ts"))

    def dump(path: Path, data: dict[str, Any]) -> None:
        path.write_text(json.dumps(data, indent=2) + "\n")

    dump(out / "configs" / "metadata.json", metadata(metrics, training))
    dump(out / "configs" / "inference.json", inference_config(network_args))
    (out / "docs" / "README.md").write_text(readme(metrics, training))
    (out / "codes.toml").write_text(tomli_w.dumps(codes()))
