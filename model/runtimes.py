"""The runtimes a model's weights run on: torch (state_dict, TorchScript) and ONNX Runtime.

A runtime turns one batch of network input (n, c, h, w) float32 into the
outputs its manifest names (`weights.outputs`): the logits (n, labels) and,
where the model exports one, a class-activation map (n, labels, h', w').
Batching, calibration and saliency are the same for every runtime
(`model.inference`); only Grad-CAM needs a torch network it can hook.

ONNX Runtime is given the bytes that were hashed, never a path, so the
file cannot change between the check and the load. It runs on the CUDA
execution provider where the device is a GPU and onnxruntime-gpu provides
it, else on the CPU with as many threads as torch uses.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

# (logits (n, labels), cam (n, labels, h', w') or None)
Outputs = tuple[np.ndarray, np.ndarray | None]
# Each output by its role: "logits", "cam", "detections" (n, k, 6).
Named = dict[str, np.ndarray]


class RuntimeOutputError(Exception):
    """The network's outputs do not fit what its manifest declares."""


class Runtime(Protocol):
    name: str
    device: torch.device

    @property
    def has_cam(self) -> bool: ...

    def forward(self, x: np.ndarray) -> Outputs: ...

    def named(self, x: np.ndarray) -> Named: ...

    def explainable(self) -> nn.Module | None:
        """A torch network Grad-CAM can hook, or None."""
        ...


def _by_role(outputs: Sequence[Any], roles: Sequence[str]) -> Named:
    if len(outputs) != len(roles):
        raise RuntimeOutputError(f"the network returns {len(outputs)} outputs, its manifest names "
                                 f"{len(roles)} ({', '.join(roles)})")  # fmt: skip
    return {role: np.asarray(out, dtype=np.float32)
            for role, out in zip(roles, outputs, strict=True)}  # fmt: skip


def classification(found: Named) -> Outputs:
    """A classifier's logits and class-activation map (None where it exports none)."""
    if "logits" not in found:
        raise RuntimeOutputError("the network gives no logits: not a classification model")
    return found["logits"], found.get("cam")


_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TorchRuntime:
    """A torch network (state_dict or TorchScript), under `inference_mode`.

    Autocast runs on CUDA only, in the manifest's precision.
    """

    def __init__(
        self, network: nn.Module, device: torch.device, roles: Sequence[str] = ("logits",),
        gpu_precision: str = "fp16",
    ) -> None:
        self.network = network
        self.device = device
        self.roles = tuple(roles)
        self.gpu_precision = gpu_precision
        self.name = "torchscript" if isinstance(network, torch.jit.ScriptModule) else "torch"

    @property
    def has_cam(self) -> bool:
        return "cam" in self.roles

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = _AUTOCAST.get(self.gpu_precision)
        if self.device.type == "cuda" and dtype is not None:
            return torch.autocast(device_type="cuda", dtype=dtype)
        return contextlib.nullcontext()

    def forward(self, x: np.ndarray) -> Outputs:
        return classification(self.named(x))

    def named(self, x: np.ndarray) -> Named:
        with torch.inference_mode(), self._autocast():
            out = self.network(torch.from_numpy(np.ascontiguousarray(x)).to(self.device))
            parts = out if isinstance(out, (tuple, list)) else (out,)
            return _by_role([p.float().cpu().numpy() for p in parts], self.roles)

    def explainable(self) -> nn.Module | None:
        return None if isinstance(self.network, torch.jit.ScriptModule) else self.network


class OnnxRuntime:
    """An ONNX model in an onnxruntime InferenceSession: one input, outputs by role."""

    name = "onnxruntime"

    def __init__(self, model_bytes: bytes, device: torch.device, roles: Sequence[str]) -> None:
        import onnxruntime as ort  # only a deployment with ONNX models pays for the import

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Its pool's threads otherwise spin after each run, taking the cores
        # from the receiver, the streamer and torch models in the same worker
        # (bench/models.py measured torch's Grad-CAM 3x slower beside them).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:
                log.warning("onnxruntime has no CUDA execution provider here "
                            "(install onnxruntime-gpu): the ONNX model runs on the CPU")
        self.session = ort.InferenceSession(model_bytes, options, providers=providers)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise RuntimeOutputError(f"an ONNX model must take one input, not {len(inputs)}")
        self.input_name = inputs[0].name
        self.roles = tuple(roles)
        used = self.session.get_providers()[0]
        self.device = torch.device("cuda" if used == "CUDAExecutionProvider" else "cpu")

    @property
    def has_cam(self) -> bool:
        return "cam" in self.roles

    def forward(self, x: np.ndarray) -> Outputs:
        return classification(self.named(x))

    def named(self, x: np.ndarray) -> Named:
        feed = {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}
        return _by_role(self.session.run(None, feed), self.roles)

    def explainable(self) -> nn.Module | None:
        return None


class Transposed:
    """A runtime whose network reads each slice with its two axes swapped (`layout =
    "columns_rows"`: a network trained in MONAI, whose readers give (x, y) arrays).

    The input is transposed on the way in and the class-activation map back on
    the way out, so the rest of the daemon sees (rows, columns) throughout.
    """

    def __init__(self, inner: Runtime) -> None:
        self.inner = inner
        self.name = inner.name
        self.device = inner.device

    @property
    def has_cam(self) -> bool:
        return self.inner.has_cam

    def forward(self, x: np.ndarray) -> Outputs:
        return classification(self.named(x))

    def named(self, x: np.ndarray) -> Named:
        found = self.inner.named(np.ascontiguousarray(np.swapaxes(x, -1, -2)))
        if "cam" in found:
            found["cam"] = np.ascontiguousarray(np.swapaxes(found["cam"], -1, -2))
        if "detections" in found:  # (x0, y0, x1, y1) of the transposed slice: y and x swap
            found["detections"] = found["detections"][..., [1, 0, 3, 2, 4, 5]]
        return found

    def explainable(self) -> nn.Module | None:
        return None  # Grad-CAM's hooks would see the transposed slice: no saliency that way
