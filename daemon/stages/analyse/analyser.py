"""What the infer stage runs on a study: its series' spool files in, AnalysisResults out.

The worker only knows the `Analyser` protocol; `ModelAnalyser` is the real
one (the configured models, loaded once when the worker starts). Tests of
the queue give the worker stand-ins through `worker.analyser`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from daemon.config import Config
from model.manifest import ModelManifest
from model.results import AlgorithmInfo, AnalysisResult, Outcome

if TYPE_CHECKING:
    import numpy as np

    from model.inference import Prediction
    from model.registry import LoadedModel

log = logging.getLogger(__name__)


class Analyser(Protocol):
    def analyse(
        self, study_instance_uid: str, series: Mapping[str, Sequence[Path]]
    ) -> list[AnalysisResult]:
        """Analyse one study given as series UID -> its files.

        At least one result comes back, even if only "not applicable". Series
        QC problems are results (outcome failed_qc), not exceptions: an
        exception means "try again later".
        """
        ...


class ModelAnalyser:
    """The configured models, loaded once, run on a study through model/analysis."""

    def __init__(
        self,
        model_dirs: Sequence[Path] | None,
        *,
        device: str = "auto",
        batch_size: int = 16,
        stream_memory_mb: int = 2048,
    ) -> None:
        # Imported here: torch is heavy, and the tests' stand-in analysers don't need it.
        from model.registry import ModelRegistry
        from model.stream import ReadAhead

        self.registry = ModelRegistry(model_dirs, device)
        self.models = [_Batched(m, batch_size) for m in self.registry.models]
        if not self.models:
            log.warning("no model configured: every study will be reported as not analysed")
        self.ahead = ReadAhead(self.models, max_bytes=stream_memory_mb * 2**20)

    @classmethod
    def from_config(cls, config: Config) -> ModelAnalyser:
        paths = config.models.paths or None  # None: the models shipped in model/builtin
        return cls(
            paths,
            device=config.worker.device,
            batch_size=config.worker.batch_size,
            stream_memory_mb=config.worker.stream_memory_mb,
        )

    def prepare(self, study_instance_uid: str, paths: Sequence[Path]) -> int:
        """Read and prepare images of a study still arriving (the streamer's call)."""
        if not self.models:
            return 0
        return self.ahead.add(study_instance_uid, paths)

    def forget_idle(self, seconds: float) -> list[str]:
        return self.ahead.drop_idle(seconds)

    def analyse(
        self, study_instance_uid: str, series: Mapping[str, Sequence[Path]]
    ) -> list[AnalysisResult]:
        from dicom_io.series import choose_series
        from model.analysis import analyse_study

        if not self.models:
            return [_not_applicable(study_instance_uid, "no AI model is installed")]
        # Regrouped from the headers: a projection series is one analysis per image.
        files = [path for paths in series.values() for path in paths]
        # The lock pauses the streamer: a completed study goes first.
        with self.ahead.lock:
            self.ahead.close(study_instance_uid)
            taken = self.ahead.take(files)
            try:
                candidates = choose_series(files, taken.headers())
                return analyse_study(
                    candidates, self.models, study_instance_uid=study_instance_uid, ahead=taken
                )
            finally:
                self.ahead.drop_study(study_instance_uid)


def _not_applicable(study_instance_uid: str, reason: str) -> AnalysisResult:
    return AnalysisResult(
        study_instance_uid=study_instance_uid,
        series_instance_uid=None,
        outcome=Outcome.NOT_APPLICABLE,
        algorithm=None,
        reason=reason,
    )


class _Batched:
    """A loaded model whose `predict` uses the configured batch size (worker.batch_size)."""

    def __init__(self, model: LoadedModel, batch_size: int) -> None:
        self._model = model
        self._batch_size = batch_size

    @property
    def manifest(self) -> ModelManifest:
        return self._model.manifest

    @property
    def device(self) -> object:
        """Where the network runs (the run's provenance records it)."""
        return self._model.device

    def predict(self, slices: np.ndarray, *, known: np.ndarray | None = None) -> Prediction:
        return self._model.predict(slices, batch_size=self._batch_size, known=known)

    def probabilities(self, slices: np.ndarray) -> np.ndarray:
        return self._model.probabilities(slices, batch_size=self._batch_size)

    def detections(self, slices: np.ndarray) -> np.ndarray:
        return self._model.detections(slices, batch_size=self._batch_size)

    def detections_3d(self, volume: np.ndarray) -> np.ndarray:
        return self._model.detections_3d(volume)

    def segment(self, volume: np.ndarray) -> np.ndarray:
        # Windows a forward pass, as the manifest says: a window is a whole
        # 3D patch, and worker.batch_size counts 2D slices.
        return self._model.segment(volume)

    def algorithm_info(self) -> AlgorithmInfo:
        return self._model.algorithm_info()

    def applicability(
        self,
        modality: str | None,
        body_part: str | None = None,
        series_description: str | None = None,
        n_slices: int = 1,
    ) -> str | None:
        return self._model.applicability(modality, body_part, series_description, n_slices)
