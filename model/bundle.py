"""MONAI bundles as model folders (`model import-bundle`), without executing their config.

A bundle (a folder or a zip) holds `configs/metadata.json`,
`configs/inference.json` and `models/model.ts` (TorchScript) or
`models/model.pt` (a state_dict for its `network_def`). MONAI's own parser
would instantiate every `_target_` and eval every `$` expression: here the
JSON is only read and walked. Any `$` expression or `%` macro, and any
`_target_` not on the allow-lists below, refuses the bundle with the key
path that holds it (`preprocessing#transforms#2#keys`). `@` references are
plain look-ups in the same file. YAML configs are not read.

The preprocessing transforms are translated into an `InputSpec`, which the
daemon's own SimpleITK steps carry out; a transform that cannot be
translated exactly enough is refused with its key, never skipped. Two
kinds of bundle are hosted: 2D per-slice classifiers, and 3D segmentation
networks run by a SlidingWindowInferer (its window, overlap and blending
become `[inference]`, its softmax/argmax or sigmoid/threshold `[segmentation]`).
The bundle cannot say which SNOMED CT codes its outputs mean, nor whom it
is for: a small TOML gives the labels and the intended use.
"""

from __future__ import annotations

import json
import re
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ValidationError

from model.export import _make_folder, vouched_manifest
from model.manifest import InputSpec, ModelManifest
from model.registry import MONAI_NETWORKS, ModelLoadError, sha256_bytes

MAX_BUNDLE_BYTES = 2 << 30  # uncompressed: what a zip's members may add up to
_MEMBERS = ("configs/metadata.json", "configs/inference.json", "configs/inference.yaml",
            "models/model.ts", "models/model.pt")
# Transforms we translate (their dictionary "...d" variants too) ...
_NO_OPS = {"LoadImage", "EnsureChannelFirst", "EnsureType", "ToTensor", "CastToType"}
_SPATIAL = {"Orientation", "Spacing", "Resize", "ResizeWithPadOrCrop"}
_INTENSITY = {"ScaleIntensityRange", "NormalizeIntensity"}
_POST = {"Activations", "AsDiscrete"}
# Postprocessing a bundle needs to write files, which the daemon does its own
# way (it maps the label map back onto the source images and writes a SEG).
_POST_NO_OPS = {"Invert", "SaveImage"}
_TRANSFORMS = _NO_OPS | _SPATIAL | _INTENSITY | _POST | _POST_NO_OPS | {"CropForeground"}
# ... and the workflow objects a bundle's inference.json names that the daemon
# never builds (it has its own loading and inference loop): known, so allowed.
_WORKFLOW = {"Compose", "Dataset", "DataLoader", "SimpleInferer", "SlidingWindowInferer",
             "SupervisedEvaluator", "CheckpointLoader", "StatsHandler"}
_PREFIXES = ("monai.transforms.", "monai.networks.nets.", "monai.data.", "monai.inferers.",
             "monai.engines.", "monai.handlers.")
_SCALAR = (bool, int, float, str)


class BundleError(ModelLoadError):
    """The bundle cannot become a model folder: the message names the file and key."""


def _short(target: str) -> str:
    for prefix in _PREFIXES:
        rest = target.removeprefix(prefix)
        if rest != target and "." not in rest:
            return rest
    return target


def _base(name: str) -> str:
    """The array transform of a dictionary transform: Spacingd -> Spacing."""
    return name[:-1] if name.endswith("d") and name[:-1] in _TRANSFORMS else name


def _allowed(target: str) -> bool:
    name = _short(target)
    return _base(name) in _TRANSFORMS or name in _WORKFLOW or name in MONAI_NETWORKS


# -- reading ---------------------------------------------------------------------------


def read_members(path: Path) -> dict[str, bytes]:
    """The bundle's files we read, by their path inside the bundle (`configs/...`)."""
    path = Path(path)
    if path.is_dir():
        root, out = path.resolve(), {}
        for name in _MEMBERS:
            member = path / name
            if member.is_file():
                if not member.resolve().is_relative_to(root):
                    raise BundleError(f"{path}: {name} links outside the bundle")
                out[name] = member.read_bytes()
        return out
    if not zipfile.is_zipfile(path):
        raise BundleError(f"{path} is neither a bundle folder nor a zip")
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        for info in infos:
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in info.filename:
                raise BundleError(f"{path}: zip member {info.filename!r} points outside the "
                                  "bundle: refused")
        if sum(i.file_size for i in infos) > MAX_BUNDLE_BYTES:
            raise BundleError(f"{path}: more than {MAX_BUNDLE_BYTES >> 20} MiB uncompressed")
        # A zip of the bundle folder has it one level down (name/configs/metadata.json).
        prefixes = [i.filename[: -len(_MEMBERS[0])] for i in infos
                    if i.filename.endswith(_MEMBERS[0]) and i.filename.count("/") <= 2]
        if len(prefixes) != 1:
            raise BundleError(f"{path}: needs exactly one configs/metadata.json, has "
                              f"{len(prefixes)}")
        out = {}
        for info in infos:
            name = info.filename.removeprefix(prefixes[0])
            if name in _MEMBERS and info.filename == prefixes[0] + name:
                with zf.open(info) as fh:  # read bounded: a zip's sizes are only claims
                    data = fh.read(MAX_BUNDLE_BYTES + 1)
                if len(data) > MAX_BUNDLE_BYTES:
                    raise BundleError(f"{path}: {info.filename} is larger than it says")
                out[name] = data
        return out


def _json(members: dict[str, bytes], name: str) -> dict[str, Any]:
    if name not in members:
        raise BundleError(f"the bundle has no {name}")
    try:
        value = json.loads(members[name])
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{name} is not JSON: {exc}") from exc
    except RecursionError:  # nested deeper than any real config: walking it would fail too
        raise BundleError(f"{name} is nested too deeply to read") from None
    if not isinstance(value, dict):
        raise BundleError(f"{name} is not a JSON object")
    return value


def check_config(node: Any, path: str = "") -> None:
    """Refuse any `$` expression, `%` macro, non-default `_mode_` or unknown `_target_`."""
    where = path or "(top)"
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and not (isinstance(target, str) and _allowed(target)):
            raise BundleError(f"inference.json {where}#_target_: {target!r} is not on "
                              "secondreader's allow-list; a bundle's config is never executed")
        if node.get("_mode_", "default") != "default":
            raise BundleError(f"inference.json {where}#_mode_: only the default mode is read")
        for key, value in node.items():
            check_config(value, f"{path}#{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_config(value, f"{path}#{i}")
    elif isinstance(node, str) and node.startswith(("$", "%")):
        kind = "expression" if node.startswith("$") else "macro"
        raise BundleError(f"inference.json {where}: {node[:60]!r} is a {kind}; a bundle's "
                          "config is never executed: write literal values")


def _resolve(config: dict[str, Any], value: Any, path: str, depth: int = 0) -> Any:
    """`@id` (or `@a::b`, `@a#b`) looked up in the config; anything else as it is."""
    if not (isinstance(value, str) and value.startswith("@")):
        return value
    if depth > 8:
        raise BundleError(f"inference.json {path}: references {value!r} in a loop")
    node: Any = config
    for part in re.split(r"::|#", value[1:]):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise BundleError(f"inference.json {path}: reference {value!r} names no key")
    return _resolve(config, node, path, depth + 1)


# -- translation -----------------------------------------------------------------------


@dataclass
class Translation:
    """What the bundle's transforms become, and a line per transform for the record."""

    input: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    inference: dict[str, Any] = field(default_factory=dict)  # a 3D bundle's sliding window
    segmentation: dict[str, Any] | None = None
    steps: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Transform:
    def __init__(self, config: dict[str, Any], node: Any, path: str) -> None:
        if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
            raise BundleError(f"inference.json {path}: not a transform (no _target_)")
        self.config, self.node, self.path = config, node, path
        self.name = _short(node["_target_"])
        self.base = _base(self.name)

    def arg(self, key: str, default: Any = None) -> Any:
        value = _resolve(self.config, self.node.get(key, default), f"{self.path}#{key}")
        if not (value is None or isinstance(value, _SCALAR)
                or (isinstance(value, list) and all(isinstance(v, _SCALAR) for v in value))):
            raise BundleError(f"inference.json {self.path}#{key}: not a literal value")
        return value

    def refuse(self, key: str, why: str) -> BundleError:
        return BundleError(f"inference.json {self.path}#{key}: {self.name}: {why}")


def _transforms(config: dict[str, Any], key: str) -> list[_Transform]:
    """The transforms of the Compose at `key`, nested Composes flattened, disabled ones left out."""
    return _compose(config, _resolve(config, config.get(key), key), key)


def _compose(config: dict[str, Any], node: Any, path: str) -> list[_Transform]:
    if node is None:
        return []
    if not isinstance(node, dict) or _short(str(node.get("_target_"))) != "Compose":
        raise BundleError(f"inference.json {path}: not a Compose of transforms")
    out: list[_Transform] = []
    items = _resolve(config, node.get("transforms"), f"{path}#transforms") or []
    for i, item in enumerate(items):
        where = f"{path}#transforms#{i}"
        t = _Transform(config, _resolve(config, item, where), where)
        if t.arg("_disabled_") is True:
            continue
        out += _compose(config, t.node, where) if t.name == "Compose" else [t]
    return out


def _size(t: _Transform, key: str) -> tuple[int, int]:
    size = t.arg(key)
    if not (isinstance(size, list) and len(size) == 2 and all(
            isinstance(v, int) and v > 0 for v in size)):
        raise t.refuse(key, f"{size!r}: a 2D model needs two positive sizes")
    return size[1], size[0]  # MONAI's (x, y) -> our (rows, columns)


def translate(config: dict[str, Any], three_d: bool = False) -> Translation:
    """The bundle's preprocessing and postprocessing as an InputSpec (as a dict) and a threshold
    (and, for a 3D segmentation bundle, its sliding window and activation).

    secondreader orients, resamples, then maps intensities: a bundle whose
    intensity step comes before a resampling step is refused, since clipping
    and per-slice statistics do not commute with interpolation.
    """
    tr = Translation(input={"denoise": "none", "contrast": "none", "layout": "columns_rows"})
    spec, inplane, intensity = tr.input, False, ""
    for t in _transforms(config, "preprocessing"):
        if t.base in ("Spacing", "Resize", "ResizeWithPadOrCrop") and intensity:
            raise t.refuse("_target_", f"resamples after the intensity step {intensity}; "
                           "secondreader resamples first (clipping does not commute with it)")
        if t.base in _INTENSITY and intensity:
            raise t.refuse("_target_", f"a second intensity step after {intensity}: "
                           "secondreader applies one")
        if t.base in _NO_OPS:
            tr.steps.append(f"{t.name}: no-op (secondreader reads DICOM into float32 itself)")
        elif t.base == "Orientation":
            codes = str(t.arg("axcodes", "")).upper()
            orientation = {"RAS": "RAS", "RA": "RAS", "LPS": "LPS", "LP": "LPS"}.get(codes)
            if orientation is None:
                raise t.refuse("axcodes", f"{codes!r}: only RAS or LPS")
            spec["orientation"] = orientation
            tr.steps.append(f"{t.name} {codes}: orientation {orientation}")
        elif t.base == "Spacing":
            if t.arg("mode", "bilinear") != "bilinear":
                raise t.refuse("mode", "only bilinear: secondreader resamples linearly")
            pixdim = t.arg("pixdim")
            pixdim = [pixdim] * 3 if isinstance(pixdim, (int, float)) else pixdim
            if not (isinstance(pixdim, list) and len(pixdim) in (2, 3)
                    and all(isinstance(v, (int, float)) for v in pixdim)):
                raise t.refuse("pixdim", f"{pixdim!r}: two or three numbers")
            if three_d and not (len(pixdim) == 3 and all(v > 0 for v in pixdim)):
                raise t.refuse("pixdim", f"{pixdim!r}: a 3D network's grid needs three "
                               "positive spacings (secondreader keeps no axis as acquired)")
            if all(v > 0 for v in pixdim[:2]):  # MONAI: <= 0 keeps the axis as it is
                spec["spacing"], inplane = (float(pixdim[1]), float(pixdim[0])), True
            if len(pixdim) == 3 and pixdim[2] > 0:
                spec["slice_spacing"] = float(pixdim[2])
            tr.steps.append(f"{t.name} {pixdim}: spacing {spec.get('spacing')}, "
                            f"slice spacing {spec.get('slice_spacing')}")
        elif t.base in ("Resize", "ResizeWithPadOrCrop") and three_d:
            raise t.refuse("_target_", "a 3D network reads windows of the inferer's roi_size "
                           "on the Spacing grid; a resize would change the spacing it was "
                           "trained on")
        elif t.base == "Resize":
            if inplane:
                raise t.refuse("_target_", "after an in-plane Spacing: two resamplings, "
                               "secondreader does one (use ResizeWithPadOrCrop)")
            if t.arg("mode", "area") not in ("bilinear", "linear"):
                raise t.refuse("mode", f"{t.arg('mode', 'area')!r} (MONAI's default is area, "
                               "an average): secondreader resamples linearly; give 'bilinear'")
            if t.arg("align_corners") or t.arg("size_mode", "all") != "all":
                raise t.refuse("align_corners", "only align_corners false, size_mode all")
            spec["size"] = _size(t, "spatial_size")
            tr.steps.append(f"{t.name}: the field of view fitted to {spec['size']} (linear)")
        elif t.base == "ResizeWithPadOrCrop":
            if not inplane:
                raise t.refuse("_target_", "without an in-plane Spacing before it: the size "
                               "is in source pixels, which differ between series")
            spec["size"] = _size(t, "spatial_size")
            tr.notes.append(f"{t.path}: MONAI pads with {t.arg('mode', 'constant')!r} (0 by "
                            "default); secondreader pads with the slice's minimum")
            tr.steps.append(f"{t.name}: {spec['size']} about the centre")
        elif t.base == "ScaleIntensityRange":
            a_min, a_max = t.arg("a_min"), t.arg("a_max")
            if (t.arg("b_min"), t.arg("b_max"), t.arg("clip", False)) != (0, 1, True):
                raise t.refuse("b_min", "only b_min 0, b_max 1, clip true (a CT window)")
            if not (isinstance(a_min, (int, float)) and isinstance(a_max, (int, float))
                    and a_max > a_min):
                raise t.refuse("a_min", f"a_min {a_min!r}, a_max {a_max!r}: numbers, a_min first")
            spec["contrast"], intensity = "window", t.path
            spec["window"] = ((a_min + a_max) / 2.0, float(a_max - a_min))
            tr.steps.append(f"{t.name} [{a_min}, {a_max}] -> [0, 1] clipped: window "
                            f"{spec['window']}")
        elif t.base == "NormalizeIntensity":
            if t.arg("subtrahend") is not None or t.arg("divisor") is not None:
                raise t.refuse("subtrahend", "only the image's own mean and deviation")
            spec["contrast"], intensity = "zscore", t.path
            spec["zscore_nonzero"] = bool(t.arg("nonzero", False))
            tr.steps.append(f"{t.name} nonzero={spec['zscore_nonzero']}: zscore per slice")
        elif t.base == "CropForeground" and three_d:
            _crop_foreground(t, spec, intensity)
            tr.steps.append(f"{t.name} margin {spec['crop_margin']}: the windows cover the "
                            "box of voxels above 0, the rest is background")
        elif t.base == "CropForeground":
            raise t.refuse("_target_", "a crop to the image's content would give every series "
                           "its own grid; secondreader's grid follows the series' geometry "
                           "alone (slice by slice while it arrives, maps back onto it)")
        else:
            raise t.refuse("_target_", "not a preprocessing transform secondreader translates")
    if three_d:
        if "orientation" not in spec or "slice_spacing" not in spec:
            raise BundleError("inference.json preprocessing: a 3D bundle needs an Orientation(d) "
                              "and a Spacing(d) with three spacings, to know the network's grid")
        spec["dims"] = "3d"
        _inferer(config, tr)
        _segmentation_postprocessing(config, tr)
        return tr
    if "orientation" not in spec or "size" not in spec:
        raise BundleError("inference.json preprocessing: needs an Orientation(d) and a "
                          "Resize(d) or ResizeWithPadOrCrop(d), to know the network's grid")
    _postprocessing(config, tr)
    return tr


def _crop_foreground(t: _Transform, spec: dict[str, Any], intensity: str) -> None:
    """CropForeground(d) with MONAI's defaults: the box of voxels above 0, plus a margin."""
    if not intensity:
        raise t.refuse("_target_", "before the intensity step: secondreader crops the "
                       "scaled volume, where MONAI's default (voxels above 0) means tissue")
    for key in ("select_fn", "channel_indices", "k_divisible", "start_coord_key"):
        if t.node.get(key) not in (None, 1) or (key == "k_divisible" and t.arg(key, 1) != 1):
            raise t.refuse(key, "only MONAI's defaults (voxels above 0, no rounding up)")
    margin = t.arg("margin", 0)
    if not (isinstance(margin, int) and not isinstance(margin, bool) and margin >= 0):
        raise t.refuse("margin", f"{margin!r}: one whole number of voxels for every axis")
    spec["crop_foreground"], spec["crop_margin"] = True, margin


def _inferer(config: dict[str, Any], tr: Translation) -> None:
    node = _resolve(config, config.get("inferer"), "inferer")
    t = _Transform(config, node, "inferer")
    if t.name != "SlidingWindowInferer":
        raise t.refuse("_target_", "a 3D bundle needs a SlidingWindowInferer: secondreader "
                       "runs 3D networks in windows, never on a whole volume at once")
    roi = t.arg("roi_size")
    if not (isinstance(roi, list) and len(roi) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in roi)):
        raise t.refuse("roi_size", f"{roi!r}: three positive sizes")
    mode = t.arg("mode", "constant")
    if mode not in ("gaussian", "constant"):
        raise t.refuse("mode", f"{mode!r}: gaussian or constant blending")
    for key in ("padding_mode", "cval", "roi_weight_map", "buffer_steps", "with_coord"):
        if t.node.get(key) not in (None, "constant", 0, 0.0, False):
            raise t.refuse(key, "only MONAI's default")
    tr.inference = {"roi_size": roi, "batch_size": t.arg("sw_batch_size", 1),
                    "overlap": t.arg("overlap", 0.25), "blend": mode,
                    "sigma_scale": t.arg("sigma_scale", 0.125)}
    tr.steps.append(f"SlidingWindowInferer roi {roi}, overlap {tr.inference['overlap']}, "
                    f"{mode} blending, {tr.inference['batch_size']} windows a batch")


def _segmentation_postprocessing(config: dict[str, Any], tr: Translation) -> None:
    activation = ""
    for t in _transforms(config, "postprocessing"):
        if t.base in _NO_OPS - {"LoadImage", "EnsureChannelFirst"} or t.base in _POST_NO_OPS:
            tr.steps.append(f"{t.name}: the daemon maps the label map back and writes a SEG")
        elif t.base == "Activations" and t.arg("softmax") and not t.arg("sigmoid"):
            activation = "softmax"
        elif t.base == "Activations" and t.arg("sigmoid") and not t.arg("softmax"):
            activation = "sigmoid"
        elif t.base == "AsDiscrete" and activation == "softmax" and t.arg("argmax"):
            if t.arg("threshold") is not None or t.arg("to_onehot"):
                raise t.refuse("argmax", "argmax alone after a softmax")
            tr.segmentation = {"activation": "softmax"}
        elif t.base == "AsDiscrete" and activation == "sigmoid":
            threshold = t.arg("threshold")
            if t.arg("argmax") or not isinstance(threshold, (int, float)):
                raise t.refuse("threshold", "a threshold alone after a sigmoid")
            tr.segmentation, tr.threshold = {"activation": "sigmoid"}, float(threshold)
        else:
            raise t.refuse("_target_", "not a segmentation postprocessing secondreader "
                           "translates (Activations softmax then AsDiscrete argmax, or "
                           "sigmoid then threshold)")
    if tr.segmentation is None:
        raise BundleError("inference.json postprocessing: a segmentation bundle must say how "
                          "its output becomes labels (Activations then AsDiscrete)")
    tr.steps.append(f"{tr.segmentation['activation']} then "
                    f"{'argmax' if activation == 'softmax' else 'threshold'}: the label map")


def _postprocessing(config: dict[str, Any], tr: Translation) -> None:
    sigmoid = False
    for t in _transforms(config, "postprocessing"):
        if t.base in _NO_OPS - {"LoadImage", "EnsureChannelFirst"}:
            continue
        if t.base == "Activations":
            if t.arg("softmax") or t.arg("other") is not None:
                raise t.refuse("softmax", "secondreader gives each label its own sigmoid; "
                               "a softmax over labels is not hosted")
            sigmoid = bool(t.arg("sigmoid"))
            tr.steps.append(f"{t.name} sigmoid={sigmoid}: the daemon's sigmoid")
        elif t.base == "AsDiscrete":
            threshold = t.arg("threshold")
            if t.arg("argmax") or t.arg("to_onehot") or not isinstance(threshold, (int, float)):
                raise t.refuse("threshold", "only a threshold on sigmoid probabilities")
            if not sigmoid:
                raise t.refuse("threshold", "a threshold without a sigmoid before it is on "
                               "logits; secondreader's threshold is on probabilities")
            tr.threshold = float(threshold)
            tr.steps.append(f"{t.name} threshold {threshold}: the manifest's threshold")
        else:
            raise t.refuse("_target_", "not a postprocessing transform secondreader translates")


# -- the model folder --------------------------------------------------------------------


def _refuse_unhostable(meta: dict[str, Any], config: dict[str, Any]) -> tuple[int, int, bool]:
    """(input channels, output channels, 3D segmentation?); refuses what is neither a 2D
    per-slice classifier nor a 3D segmentation network."""
    fmt = meta.get("network_data_format") or {}
    inputs, outputs = fmt.get("inputs") or {}, fmt.get("outputs") or {}
    if len(inputs) != 1 or len(outputs) != 1:
        raise BundleError("metadata.json network_data_format: needs one input and one output")
    (in_key, image), (out_key, pred) = next(iter(inputs.items())), next(iter(outputs.items()))
    shape = image.get("spatial_shape") or []
    net = config.get("network_def") or {}
    dims = net.get("spatial_dims", len(shape) or 2) if isinstance(net, dict) else len(shape) or 2
    kind = f"{pred.get('type', '?')}/{pred.get('format', '?')}"
    segmentation = pred.get("type") == "image" and pred.get("format") == "segmentation"
    three_d = len(shape) == 3 or dims == 3
    if three_d != segmentation:
        raise BundleError(f"metadata.json: {meta.get('name', 'this bundle')} is a "
                          f"{len(shape) or dims}D {kind} bundle (input {in_key!r} spatial shape "
                          f"{shape}, output {out_key!r} {kind}): not hostable yet; secondreader "
                          "hosts 2D per-slice classifiers and 3D segmentation networks")
    return int(image.get("num_channels", 1)), int(pred.get("num_channels", 1)), segmentation


def _network(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    node = config.get("network_def")
    if not isinstance(node, dict):
        raise BundleError("models/model.pt needs inference.json network_def (or ship model.ts)")
    name = _short(str(node.get("_target_")))
    if name not in MONAI_NETWORKS:
        raise BundleError(f"inference.json network_def#_target_: {name!r} is not one of "
                          f"{sorted(MONAI_NETWORKS)}; ship the network as models/model.ts")
    args = {}
    for key in node:
        if key.startswith("_") and key.endswith("_"):
            continue
        value = _resolve(config, node[key], f"network_def#{key}")
        ok = isinstance(value, _SCALAR) or (isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value))
        if not ok:
            raise BundleError(f"inference.json network_def#{key}: not a literal value")
        if "pretrain" in key and value:
            raise BundleError(f"inference.json network_def#{key}: pretrained weights would be "
                              "downloaded; the bundle's model.pt is the weights")
        args[key] = value
    return f"monai.networks.nets:{name}", args


_EXTRA_KEYS = {"name", "version", "manufacturer", "intended_use", "applies_to", "labels",
               "threshold", "inference", "calibration", "weights", "segmentation", "max_findings"}


def bundle_manifest(path: Path, extra_file: Path) -> tuple[ModelManifest, bytes]:
    """The manifest and weights bytes of the model folder the bundle at `path` becomes."""
    members = read_members(path)
    if "configs/inference.json" not in members and "configs/inference.yaml" in members:
        raise BundleError(f"{path}: configs/inference.yaml is not read here; give the config "
                          "as configs/inference.json")
    meta, config = _json(members, _MEMBERS[0]), _json(members, _MEMBERS[1])
    # What the bundle is comes first: a 3D segmentation bundle hears that, not
    # that its workflow's targets are unknown. Only literal keys are read for it.
    in_channels, out_channels, segmentation = _refuse_unhostable(meta, config)
    check_config(config)
    tr = translate(config, three_d=segmentation)
    if tr.segmentation is not None and tr.segmentation["activation"] == "softmax":
        out_channels -= 1  # channel 0 is the background
    with Path(extra_file).open("rb") as fh:
        extra = tomllib.load(fh)
    unknown = sorted(set(extra) - _EXTRA_KEYS)
    if unknown:
        raise BundleError(f"{extra_file}: {', '.join(unknown)} not taken here (the bundle's "
                          f"config says its input); keys: {', '.join(sorted(_EXTRA_KEYS))}")
    labels = extra.get("labels") or []
    if len(labels) != out_channels:
        raise BundleError(f"{extra_file}: {len(labels)} labels, the bundle's output has "
                          f"{out_channels} channels: one label (finding and site) per channel")
    for lb in labels:
        if not all(lb.get(k, {}).get("scheme") == "SCT" for k in ("finding", "site")):
            raise BundleError(f"{extra_file}: label {lb.get('name')!r} needs SNOMED CT (SCT) "
                              "finding and site codes")
    if "models/model.ts" in members:
        data = members["models/model.ts"]
        weights: dict[str, Any] = {"file": "model.ts", "format": "torchscript"}
    elif "models/model.pt" in members:
        data = members["models/model.pt"]
        architecture, arguments = _network(config)
        weights = {"file": "model.pt", "format": "state_dict", "architecture": architecture,
                   "arguments": arguments}
    else:
        raise BundleError(f"{path}: neither models/model.ts nor models/model.pt")
    extra_weights = extra.get("weights") or (
        {"outputs": ["segmentation"]} if tr.segmentation is not None else {})
    if set(extra_weights) - {"outputs"}:
        raise BundleError(f"{extra_file}: [weights] takes only outputs; the bundle has the rest")
    name = str(extra.get("name") or meta.get("name") or Path(path).stem)
    version = str(extra.get("version") or meta.get("version") or "")
    raw = {k: v for k, v in extra.items() if k != "weights"} | {
        "name": name, "version": version,
        "description": f"From MONAI bundle {meta.get('name', name)} {meta.get('version', '?')}: "
                       f"{meta.get('description', '')}".strip(),
        "intended_use": str(extra.get("intended_use") or meta.get("intended_use") or ""),
        "threshold": extra.get("threshold", 0.5 if tr.threshold is None else tr.threshold),
        "input": tr.input | {"channels": in_channels},
        "weights": weights | extra_weights | {"sha256": sha256_bytes(data)},
        # The bundle's own held-out figures, for the AI committee (`model check`).
        "metrics": _flat_metrics(meta.get("eval_metrics")),
        **({"kind": "segmentation", "segmentation": tr.segmentation | dict(
                extra.get("segmentation") or {}),
            "inference": tr.inference | dict(extra.get("inference") or {})}
           if tr.segmentation is not None else {}),
        "training": {"source": "MONAI bundle", "bundle": str(meta.get("name", name)),
                     "bundle_version": str(meta.get("version", "")),
                     "bundle_config_sha256": sha256_bytes(members[_MEMBERS[1]]),
                     "preprocessing": "; ".join(tr.steps),
                     "differences": "; ".join(tr.notes) or "none known"},
    }
    if not version:
        raise BundleError(f"{path}: metadata.json has no version, and {extra_file} gives none")
    try:
        InputSpec.model_validate(raw["input"])
    except ValidationError as exc:
        raise BundleError(f"{extra_file}: {exc}") from exc
    manifest = vouched_manifest(raw, extra_file, BundleError)
    return manifest, data


def _flat_metrics(node: Any, prefix: str = "") -> dict[str, float]:
    """metadata.json's eval_metrics as flat numbers: {"shifted.lesion_sensitivity.low": 0.84}."""
    if isinstance(node, bool):
        return {}
    if isinstance(node, (int, float)):
        return {prefix: float(node)} if prefix else {}
    if not isinstance(node, dict):
        return {}
    out: dict[str, float] = {}
    for key, value in node.items():
        out |= _flat_metrics(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def import_bundle(path: Path, extra_file: Path, into: Path) -> ModelManifest:
    """A model folder at `into` (must not exist), loaded and probed before it is kept."""
    manifest, data = bundle_manifest(path, extra_file)
    _make_folder(into, manifest, data)
    return manifest

