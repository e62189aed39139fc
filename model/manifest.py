"""The model manifest: what a model folder promises about itself.

A model is a folder holding `manifest.toml` and its weights. The manifest is
validated here (pydantic) so that a bad manifest fails at load time with the
key that is wrong, not at the first study.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.results import CodedConcept


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
    contrast: Literal["window", "histogram", "none"] = "window"
    # CT window (center, width) in HU, for contrast = "window".
    window: tuple[float, float] | None = (-400.0, 1500.0)
    channels: int = 1


class OutputLabel(_Strict):
    name: str  # short, e.g. "nodule"
    finding: Code
    site: Code


class WeightsSpec(_Strict):
    file: str  # relative to the model folder
    sha256: str
    format: Literal["state_dict", "torchscript"] = "state_dict"
    # For state_dict: "module:Class" of the network, built with `arguments`.
    architecture: str | None = None
    arguments: dict[str, int | float | str | bool] = Field(default_factory=dict)

    @field_validator("sha256")
    @classmethod
    def _hex64(cls, v: str) -> str:
        v = v.lower()
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError("must be 64 hexadecimal digits")
        return v


class ModelManifest(_Strict):
    name: str
    version: str
    manufacturer: str = "secondreader"
    description: str = ""
    intended_use: str = ""  # shown to users: say plainly if not for clinical use
    applies_to: AppliesTo = Field(default_factory=AppliesTo)
    input: InputSpec = Field(default_factory=InputSpec)
    labels: list[OutputLabel]
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    weights: WeightsSpec
    # Test-set metrics recorded at training time (AUC, sensitivity, ...).
    metrics: dict[str, float] = Field(default_factory=dict)
    # How the weights were made (seed, data, epochs): enough to rebuild the
    # test set the metrics came from. Added after 0.1; optional.
    training: dict[str, int | float | str | bool] = Field(default_factory=dict)

    @classmethod
    def from_file(cls, path: Path) -> ModelManifest:
        with path.open("rb") as fh:
            return cls.model_validate(tomllib.load(fh))

    def to_toml(self) -> str:
        """The manifest as TOML that `from_file` reads back to an equal manifest."""
        lines: list[str] = []
        _emit_table(type(self), self, (), lines)
        return "\n".join(lines).strip() + "\n"

    def write(self, path: Path) -> None:
        path.write_text(self.to_toml(), encoding="utf-8")


# A minimal TOML writer (the standard library only reads TOML), enough for the
# manifest: scalars, lists of scalars, tables and arrays of tables.

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"TOML manifest cannot hold {v!r}")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to a TOML manifest")


def _emit_table(
    cls: type[BaseModel] | None,
    obj: BaseModel | dict[str, Any],
    path: tuple[str, ...],
    lines: list[str],
) -> None:
    items = dict(obj) if isinstance(obj, BaseModel) else obj
    subtables: list[tuple[str, Any]] = []
    for k, v in items.items():
        if v is None:
            # TOML has no null: leaving the key out only works where None is the default.
            field = cls.model_fields.get(k) if cls is not None else None
            if field is None or field.default is not None:
                raise ValueError(f"TOML manifest cannot hold None for {'.'.join((*path, k))}")
            continue
        if isinstance(v, BaseModel | dict) or (
            isinstance(v, list) and v and all(isinstance(x, BaseModel) for x in v)
        ):
            subtables.append((k, v))
        else:
            lines.append(f"{_key(k)} = {_scalar(v)}")
    for k, v in subtables:
        sub_path = (*path, k)
        header = ".".join(_key(p) for p in sub_path)
        if isinstance(v, list):
            for item in v:
                lines.extend(["", f"[[{header}]]"])
                _emit_table(type(item), item, sub_path, lines)
        else:
            lines.extend(["", f"[{header}]"])
            _emit_table(type(v) if isinstance(v, BaseModel) else None, v, sub_path, lines)
