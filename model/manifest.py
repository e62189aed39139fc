"""The model manifest: what a model folder promises about itself.

A model is a folder holding `manifest.toml` and its weights. The manifest is
validated here (pydantic) so that a bad manifest fails at load time with the
key that is wrong, not at the first study.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, Protocol

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model.evaluation import StudyEvaluation
from model.results import AlgorithmInfo, CodedConcept, Finding, ImageLocation


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Strict):
    value: str
    scheme: Literal["SCT", "DCM", "LN", "99SECONDREADER"] | str
    meaning: str

    def concept(self) -> CodedConcept:
        return CodedConcept(self.value, self.scheme, self.meaning)


class AppliesTo(_Strict):
    """Which studies the model is for. Empty lists match everything."""

    modalities: list[str] = Field(default_factory=list)  # e.g. ["CT"]
    body_parts: list[str] = Field(default_factory=list)  # BodyPartExamined, e.g. ["CHEST"]
    # fnmatch-style, case-insensitive, on SeriesDescription.
    series_description: list[str] = Field(default_factory=list)
    min_slices: int = 1


class SeriesRule(_Strict):
    """Which series of a study feeds one input channel: every non-empty field must match.

    Matches are case-insensitive; the patterns are fnmatch-style. The
    acquisition fields are the MR Image Module's (PS3.3 C.8.3.1).
    """

    name: str  # "T1", "T2", "FLAIR": what a reason calls the series it lacks
    series_description: list[str] = Field(default_factory=list)  # (0008,103E), fnmatch
    # ... and matching none of these: "*t2*" but not "*flair*".
    not_series_description: list[str] = Field(default_factory=list)
    sequence_name: list[str] = Field(default_factory=list)  # (0018,0024), fnmatch
    # (0018,0020) Scanning Sequence: each listed value must be present, e.g. ["IR"].
    scanning_sequence: list[str] = Field(default_factory=list)
    # (0008,0008) Image Type: each listed value must be present, e.g. ["ORIGINAL"].
    image_type: list[str] = Field(default_factory=list)


class InputSpec(_Strict):
    """How the preprocessing stage must shape a series for this model."""

    orientation: Literal["LPS", "RAS"] = "LPS"
    size: tuple[int, int] = (128, 128)  # in-plane (rows, columns) fed to the network
    # In-plane spacing in mm; None fits the whole field of view into `size`.
    spacing: tuple[float, float] | None = None
    # Through-plane spacing in mm; None keeps the slices as acquired.
    slice_spacing: float | None = None
    denoise: Literal["none", "gaussian", "curvature_flow"] = "gaussian"
    denoise_sigma_mm: float = 0.7  # for "gaussian"
    denoise_iterations: int = 3  # for "curvature_flow"
    # "zscore": each network slice minus its mean, over its standard deviation
    # (MONAI's NormalizeIntensity on the 2D image a 2D bundle is given).
    contrast: Literal["window", "histogram", "zscore", "none"] = "window"
    # CT window (center, width) in HU, for contrast = "window".
    window: tuple[float, float] | None = (-400.0, 1500.0)
    # For "zscore": statistics over the nonzero pixels only, zeros left at 0 (MONAI's nonzero).
    zscore_nonzero: bool = False
    channels: int = 1
    # "2d": the network reads slices (n, c, rows, cols). "3d": it reads the
    # whole volume resampled to `spacing` and `slice_spacing`, in windows of
    # `inference.roi_size` (sliding-window inference, `model.volume`).
    dims: Literal["2d", "3d"] = "2d"
    # "3d": run the network on the box of voxels above 0 after the contrast
    # step (MONAI's CropForeground), `crop_margin` voxels wider, clipped to the
    # volume; outside it every voxel is background.
    crop_foreground: bool = False
    crop_margin: int = Field(0, ge=0)
    # The order of the network's two spatial axes. MONAI's image readers give
    # arrays in ITK index order (x, y) = (columns, rows), so a network trained
    # in MONAI reads each slice transposed relative to ours ("columns_rows").
    layout: Literal["rows_columns", "columns_rows"] = "rows_columns"
    # Several series as the channels of one input (e.g. T1, T2, FLAIR), in this
    # order: the first is the reference, whose grid the others are resampled
    # onto through patient coordinates (one frame of reference required).
    # Empty: one series, `channels` from it.
    channel_series: list[SeriesRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_series_per_channel(self) -> InputSpec:
        if self.channel_series and len(self.channel_series) != self.channels:
            raise ValueError(f"channels is {self.channels} but channel_series lists "
                             f"{len(self.channel_series)} series")  # fmt: skip
        if self.dims == "3d" and (self.spacing is None or self.slice_spacing is None):
            raise ValueError("a 3d input needs spacing and slice_spacing: the grid the network "
                             "was trained on")
        return self


class OutputLabel(_Strict):
    name: str  # short, e.g. "nodule"
    finding: Code
    site: Code
    # Segmentation: "lesions", each connected region of the label is a finding
    # of its own; "structure", the label is one finding (an organ, the
    # ventricles), however many pieces it falls into.
    segment_as: Literal["lesions", "structure"] = "lesions"

    def as_finding(self, probability: float, threshold: float,
                   location: ImageLocation | None = None, **more: Any) -> Finding:  # fmt: skip
        """A finding of this label (`more`: its lesion, measurements, side, ...)."""
        return Finding(self.name, self.finding.concept(), self.site.concept(), float(probability),
                       float(threshold), location, **more)  # fmt: skip


OutputRole = Literal["logits", "cam", "detections", "segmentation"]


class WeightsSpec(_Strict):
    file: str  # relative to the model folder
    sha256: str
    format: Literal["state_dict", "torchscript", "onnx"] = "state_dict"
    # For state_dict: "module:Class" of the network, built with `arguments`.
    architecture: str | None = None
    # Literal values only (lists of integers for MONAI's block configurations).
    arguments: dict[str, int | float | str | bool | list[int]] = Field(default_factory=dict)
    # What the network returns, in order: its logits (n, labels) and, if it
    # exports one, a class-activation map per label (n, labels, h', w') that
    # drives the saliency objects instead of Grad-CAM (which needs Python hooks,
    # so TorchScript and ONNX models have no other saliency).
    outputs: list[OutputRole] = Field(default_factory=lambda: list[OutputRole](["logits"]))

    @field_validator("sha256")
    @classmethod
    def _hex64(cls, v: str) -> str:
        v = v.lower()
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError("must be 64 hexadecimal digits")
        return v

    @field_validator("outputs")
    @classmethod
    def _roles(cls, v: list[OutputRole]) -> list[OutputRole]:
        if v in (["detections"], ["segmentation"]):
            return v
        if v.count("logits") != 1 or v.count("cam") > 1 or {"detections", "segmentation"} & set(v):
            raise ValueError("needs one 'logits' output and at most one 'cam' output "
                             "(a classifier), or one 'detections' output alone (a detector), "
                             "or one 'segmentation' output alone")
        return v


class InferenceSpec(_Strict):
    """How the network is run: batch size and, on a GPU, reduced precision."""

    batch_size: int = Field(32, ge=1)
    # Autocast dtype on CUDA ("fp32": none). The CPU always runs float32:
    # CPU autocast is bfloat16, slower than float32 on most CPUs and lossier.
    gpu_precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    # A 3d model: the window it reads, in the network array's axis order, and
    # how windows overlap and are blended (MONAI's SlidingWindowInferer; the
    # batch size is then windows per forward pass).
    roi_size: tuple[int, int, int] | None = None
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    blend: Literal["gaussian", "constant"] = "gaussian"
    sigma_scale: float = Field(0.125, gt=0.0)


class SegmentationSpec(_Strict):
    """How a segmentation network's output becomes a label map, and which regions count."""

    # "softmax": output channel 0 is the background, channel i label i, each
    # voxel takes its most probable channel (MONAI's Activations(softmax) then
    # AsDiscrete(argmax)). "sigmoid": one channel per label, a voxel is in a
    # label where its probability reaches the manifest's threshold.
    activation: Literal["softmax", "sigmoid"] = "softmax"
    # Regions smaller than this are dropped as noise (they are not lesions anyone acts on).
    min_volume_ml: float = Field(0.0, ge=0.0)


class Calibration(_Strict):
    """Platt scaling of the network's logit: p = sigmoid(slope * logit + intercept).

    Fitted on validation studies at training time (on the study's maximum
    logit, since a study's probability is the maximum over its slices, and a
    monotonic map commutes with the maximum), so that "70 %" means that about
    70 of 100 such studies hold the finding, on data like the validation set.
    """

    method: Literal["platt"] = "platt"
    slope: float = Field(gt=0.0)  # > 0: calibration never reverses the ranking
    intercept: float
    fitted_on: str = ""  # e.g. "40 synthetic validation studies, seed 0"


class Range(_Strict):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        return self


class Expectations(_Strict):
    """What the model was made for, beyond `applies_to`: outside it, the AI does not run.

    Recorded from the training studies (`model.expectations.record`); each
    range unset is not checked. Intensities are in modality units (HU on CT).
    """

    planes: list[Literal["axial", "coronal", "sagittal"]] = Field(default_factory=list)
    field_of_view: Range | None = None  # mm, the larger in-plane extent
    p01: Range | None = None
    p50: Range | None = None
    p99: Range | None = None
    noise: Range | None = None
    recorded_from: str = ""  # e.g. "200 synthetic training studies, seed 0"


class ModelManifest(_Strict):
    name: str
    version: str
    # "classification": one probability per label and study (logits per slice).
    # "detection": boxes with scores on each slice (weights.outputs =
    # ["detections"], (n, k, 6): x0, y0, x1, y1 in network pixels, score logit,
    # label index), several lesions per label and study; with input.dims "3d"
    # boxes in the whole volume, (1, k, 8): the low and the high corner in
    # network voxels, in the network array's own axis order ((x, y, z) for a
    # MONAI network, layout "columns_rows"; (z, y, x) otherwise), score logit,
    # label index.
    # "segmentation": a label map from a 3d network (weights.outputs =
    # ["segmentation"], (n, channels, ...)), one finding per region, measured.
    kind: Literal["classification", "detection", "segmentation"] = "classification"
    # Detection: at most this many lesions per label reported, the most suspicious.
    max_findings: int = Field(5, ge=1)
    manufacturer: str = "secondreader"
    description: str = ""
    intended_use: str = ""  # shown to users: say plainly if not for clinical use
    applies_to: AppliesTo = Field(default_factory=AppliesTo)
    input: InputSpec = Field(default_factory=InputSpec)
    labels: list[OutputLabel]
    # On the (calibrated, where `calibration` is set) study probability.
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    weights: WeightsSpec
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    segmentation: SegmentationSpec | None = None
    calibration: Calibration | None = None
    expects: Expectations | None = None
    # Test-set metrics recorded at training time (AUC, sensitivity, ...), on the
    # training generator's own test split.
    metrics: dict[str, float] = Field(default_factory=dict)
    # Study-level figures with 95 % intervals on a shifted generator's studies
    # (model.evaluation): what the model is worth where it was not trained.
    evaluation: StudyEvaluation | None = None
    # How the weights were made (seed, data, epochs): enough to rebuild the
    # test set the metrics came from. Added after 0.1; optional.
    training: dict[str, int | float | str | bool] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kind_fits_outputs(self) -> ModelManifest:
        detector = self.weights.outputs == ["detections"]
        segmenter = self.weights.outputs == ["segmentation"]
        if detector != (self.kind == "detection") or segmenter != (self.kind == "segmentation"):
            raise ValueError(f"kind {self.kind!r} with weights.outputs {self.weights.outputs}: a "
                             "detection model gives ['detections'], a segmentation model "
                             "['segmentation'], a classifier its logits")
        three_d = self.input.dims == "3d"
        if segmenter and not three_d:
            raise ValueError("a segmentation model reads 3d input (input.dims)")
        if three_d and not (segmenter or detector):
            raise ValueError("a 3d input is for a segmentation or a detection model (kind)")
        if segmenter and self.inference.roi_size is None:
            raise ValueError("a 3d segmentation model needs inference.roi_size: the window "
                             "it reads")
        if segmenter and self.calibration is not None:
            raise ValueError("calibration is for a classifier's or detector's score; a "
                             "segmentation's voxel probabilities are reported as they are")
        return self

    @property
    def segmentation_spec(self) -> SegmentationSpec:
        """`[segmentation]` as given, or its defaults (softmax, no size floor)."""
        return self.segmentation or SegmentationSpec()

    def output_channels(self) -> int:
        """A segmentation network's channels: one per label, after a background for softmax."""
        softmax = self.segmentation_spec.activation == "softmax"
        return len(self.labels) + (1 if softmax else 0)

    @classmethod
    def from_file(cls, path: Path) -> ModelManifest:
        with path.open("rb") as fh:
            return cls.model_validate(tomllib.load(fh))

    def to_toml(self) -> str:
        """The manifest as TOML that `from_file` reads back to an equal manifest.

        TOML has no null and no NaN: a None where the default is not None, or a
        non-finite number, would read back as something else, and raises ValueError.
        """
        text = tomli_w.dumps(self.model_dump(exclude_none=True))
        if type(self).model_validate(tomllib.loads(text)) != self:
            raise ValueError("the manifest cannot be written as TOML as it is (a None or NaN?)")
        return text

    def write(self, path: Path) -> None:
        path.write_text(self.to_toml(), encoding="utf-8")


class Hosted(Protocol):
    """What every model kind's analysis needs of a loaded model besides its forward pass."""

    @property
    def manifest(self) -> ModelManifest: ...

    def algorithm_info(self) -> AlgorithmInfo: ...


MANIFEST_NAME = "manifest.toml"


def builtin_models_root() -> Path:
    return Path(__file__).resolve().parent / "builtin"


def builtin_model_dirs() -> list[Path]:
    """All shipped model folders, sorted by name."""
    root = builtin_models_root()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / MANIFEST_NAME).is_file())


def configured_manifests(folders: list[Path] | None) -> list[ModelManifest]:
    """The manifests of the configured model folders (None: the built-in ones), read
    without loading a network: what governance lists before a version has run."""
    out = []
    for folder in builtin_model_dirs() if folders is None else folders:
        try:
            out.append(ModelManifest.from_file(folder / MANIFEST_NAME))
        except (OSError, ValueError):
            continue  # the worker refuses it at start, with the reason
    return out
