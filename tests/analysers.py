"""Stand-in analysers for the queue and worker tests. TEST ONLY.

A worker process picks one through `worker.analyser = "tests.analysers:recording"`;
it is configured by environment variables (the process is a real
`secondreader worker`), in-process tests construct the classes directly.
They stand in for the models, not for a peer: the worker, the database and
the processes are the real ones under test.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from daemon.config import Config
from model.results import (
    AlgorithmInfo,
    AnalysisResult,
    CodedConcept,
    Finding,
    Outcome,
)

LOG_ENV = "SECONDREADER_TEST_ANALYSER_LOG"  # append "<study UID> <pid>" per analysis
SLEEP_ENV = "SECONDREADER_TEST_ANALYSER_SLEEP"  # seconds each analysis takes
# An analysis waits (at most RENDEZVOUS_SECONDS) until the log names this many
# processes: with one per worker, every worker must have claimed a job while
# the others held theirs, so the test of a shared queue does not rest on
# which process the scheduler happened to run first.
RENDEZVOUS_ENV = "SECONDREADER_TEST_ANALYSER_RENDEZVOUS"
RENDEZVOUS_SECONDS = 60.0

ALGORITHM = AlgorithmInfo(
    name="test-recorder",
    version="0",
    manufacturer="secondreader tests",
    device_uid="2.25.1",
    parameters={"threshold": "0.5"},
)
NODULE = CodedConcept("27925004", "SCT", "Nodule")
LUNG = CodedConcept("39607008", "SCT", "Lung")


class RecordingAnalyser:
    """Notes which process analysed which study, optionally taking its time."""

    def __init__(
        self, log_path: Path | None = None, sleep_seconds: float = 0.0, rendezvous: int = 0
    ) -> None:
        self.log_path = log_path
        self.sleep_seconds = sleep_seconds
        self.rendezvous = rendezvous
        self.calls: list[tuple[str, dict[str, list[Path]]]] = []

    def analyse(
        self, study_instance_uid: str, series: Mapping[str, Sequence[Path]]
    ) -> list[AnalysisResult]:
        self.calls.append((study_instance_uid, {k: list(v) for k, v in series.items()}))
        if self.log_path is not None:
            # One short O_APPEND write per line: lines from processes never interleave.
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{study_instance_uid} {os.getpid()}\n".encode())
            finally:
                os.close(fd)
            self._wait_for_the_others()
        time.sleep(self.sleep_seconds)
        series_uid = next(iter(series), None)
        return [
            AnalysisResult(
                study_instance_uid=study_instance_uid,
                series_instance_uid=series_uid,
                outcome=Outcome.ANALYSED,
                algorithm=ALGORITHM,
                findings=[Finding("nodule", NODULE, LUNG, 0.75, 0.5, None)],
                provenance=[{"step": "record", "pid": os.getpid(), "files": len(series)}],
            )
        ]


    def _wait_for_the_others(self) -> None:
        assert self.log_path is not None
        deadline = time.monotonic() + RENDEZVOUS_SECONDS
        while time.monotonic() < deadline:
            pids = {line.split()[1] for line in self.log_path.read_text().splitlines()}
            if len(pids) >= self.rendezvous:
                return
            time.sleep(0.05)


class FailingAnalyser:
    """Raises every time, as a broken dependency would."""

    def __init__(self) -> None:
        self.calls = 0

    def analyse(
        self, study_instance_uid: str, series: Mapping[str, Sequence[Path]]
    ) -> list[AnalysisResult]:
        self.calls += 1
        raise RuntimeError(f"analysis attempt {self.calls} broke")


def recording(_config: Config) -> RecordingAnalyser:
    log = os.environ.get(LOG_ENV)
    return RecordingAnalyser(
        Path(log) if log else None,
        float(os.environ.get(SLEEP_ENV, "0") or 0),
        int(os.environ.get(RENDEZVOUS_ENV, "0") or 0),
    )
