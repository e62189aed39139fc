"""The infer stage: worker threads and `secondreader worker` processes on a real database."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from daemon.config import ConfigError, WorkerConfig, load_config
from daemon.stages.analyse.analyser import Analyser
from daemon.stages.analyse.worker import Worker
from db import audit, migrate, queue
from db.audit import EventType
from db.models import AnalysisRun, Job, JobState, Study
from db.session import Database
from dicom_io.synthetic import write_ct_series
from model.phantom import phantom_volume
from model.registry import builtin_model_dirs
from tests.analysers import FailingAnalyser, RecordingAnalyser
from tests.conftest import DaemonProcess, storescu
from tests.workers import WorkerProcess, queue_studies, wait_for


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'worker.db'}"
    migrate.upgrade(url)
    return url


def _only_job(db: Database) -> Job:
    with db.session() as s:
        return s.query(Job).one()


def _job_state(db: Database) -> tuple[str, int]:
    job = _only_job(db)
    return job.state, job.attempts


def _thread_worker(
    db: Database, analyser: Analyser, tmp_path: Path, **settings: Any
) -> tuple[Worker, list[int]]:
    """A Worker whose analyser factory counts how often it is called."""
    built: list[int] = []

    def make() -> Analyser:
        built.append(1)
        return analyser

    defaults: dict[str, Any] = {
        "poll_seconds": 0.05,
        "lease_seconds": 5,
        "heartbeat_seconds": 1,
        "retry_backoff_seconds": 0.05,
    }
    config = WorkerConfig(**{**defaults, **settings})
    worker = Worker(db, make, config, spool_dir=tmp_path / "spool", state_dir=tmp_path, name="t")
    return worker, built


def test_worker_settings_are_checked() -> None:
    config = load_config(environ={"SECONDREADER_WORKER__LEASE_SECONDS": "45"})
    assert (config.worker.lease_seconds, config.worker.max_attempts) == (45, 3)
    assert config.worker.in_process and config.models.paths == []
    with pytest.raises(ConfigError, match="heartbeat_seconds must be shorter"):
        load_config(environ={"SECONDREADER_WORKER__LEASE_SECONDS": "10"})


def test_one_analyser_per_worker_and_spool_paths_by_series(sqlite_url: str, tmp_path: Path) -> None:
    db = Database(sqlite_url)
    uids = queue_studies(db, 3)
    analyser = RecordingAnalyser()
    worker, built = _thread_worker(db, analyser, tmp_path)
    worker.start()
    try:
        wait_for(lambda: len(analyser.calls) == 3 and _all_finished(db), 30, "3 jobs done")
    finally:
        worker.stop(10)
    assert built == [1]  # the models load once per worker, not once per job
    assert [uid for uid, _ in analyser.calls] == uids
    uid, series = analyser.calls[0]
    assert series == {f"{uid}.1": [tmp_path / "spool" / uid / f"{uid}.1" / f"{uid}.1.1.dcm"]}
    db.dispose()


def _all_finished(db: Database) -> bool:
    with db.session() as s:
        return s.query(Job).filter(Job.state.in_([JobState.QUEUED, JobState.RUNNING])).count() == 0


def test_failing_analysis_is_retried_then_failed(sqlite_url: str, tmp_path: Path) -> None:
    db = Database(sqlite_url)
    queue_studies(db, 1)
    analyser = FailingAnalyser()
    worker, _ = _thread_worker(db, analyser, tmp_path, max_attempts=3)
    worker.start()
    try:
        wait_for(lambda: _job_state(db)[0] == JobState.FAILED, 30, "job failed")
    finally:
        worker.stop(10)
    job = _only_job(db)
    assert (job.attempts, analyser.calls) == (3, 3)
    assert job.last_error == "RuntimeError: analysis attempt 3 broke"
    with db.session() as s:
        errors = [
            e.detail["error"]
            for e in audit.events(s)
            if e.event_type in (EventType.JOB_ATTEMPT_FAILED, EventType.JOB_FAILED)
        ]
        # Given up: one FAILED run, so that the report stage sends the not-run SR.
        runs = [(r.outcome, r.reason, r.report_state) for r in s.query(AnalysisRun)]
    assert runs == [
        (
            "failed",
            "the AI analysis failed after 3 attempt(s): RuntimeError: analysis attempt 3 broke",
            "pending",
        )
    ]
    assert errors == [f"RuntimeError: analysis attempt {n} broke" for n in (1, 2, 3)]
    db.dispose()


def test_heartbeat_keeps_the_lease_of_a_long_job(sqlite_url: str, tmp_path: Path) -> None:
    db = Database(sqlite_url)
    queue_studies(db, 1)
    # The job takes 2.5 lease lengths; a reaper (as `serve` schedules) runs all along.
    analyser = RecordingAnalyser(sleep_seconds=2.5)
    worker, _ = _thread_worker(db, analyser, tmp_path, lease_seconds=1, heartbeat_seconds=0.2)
    stop_reaping = threading.Event()

    def reap() -> None:
        while not stop_reaping.wait(0.1):
            with db.session() as s:
                queue.requeue_expired(s, worker.policy, actor="reaper")

    reaper = threading.Thread(target=reap)
    reaper.start()
    worker.start()
    try:
        wait_for(lambda: _job_state(db)[0] == JobState.DONE, 30, "job done")
    finally:
        stop_reaping.set()
        reaper.join()
        worker.stop(10)
    assert _job_state(db) == (JobState.DONE, 1)
    with db.session() as s:
        assert audit.events(s, EventType.JOB_LEASE_EXPIRED) == []
    db.dispose()


def test_killed_worker_job_is_finished_by_another(db_url: str, tmp_path: Path) -> None:
    db = Database(db_url)
    analysed = tmp_path / "analysed.txt"
    env = {"SECONDREADER_TEST_ANALYSER_LOG": str(analysed)}
    slow = WorkerProcess(
        tmp_path, db_url, name="slow", env={**env, "SECONDREADER_TEST_ANALYSER_SLEEP": "600"}
    ).start()
    rescuer = WorkerProcess(tmp_path, db_url, name="rescuer", env=env)
    try:
        slow.wait_ready()
        queue_studies(db, 1)
        wait_for(lambda: analysed.exists() and analysed.read_text(), 30, "slow worker busy")
        assert _job_state(db) == (JobState.RUNNING, 1)
        slow.kill()  # SIGKILL mid-job: no chance to release anything
        killed_at = time.monotonic()
        rescuer.start()
        wait_for(lambda: _job_state(db)[0] == JobState.DONE, 60, "job done by the rescuer")
        # Not before the 2 s lease of the dead worker ran out.
        assert time.monotonic() - killed_at >= 1.5
        rescuer.signal(signal.SIGTERM)
        assert rescuer.wait() == 0
    finally:
        slow.kill()
        rescuer.kill()
    lines = [line.split() for line in analysed.read_text().splitlines()]
    assert [pid for _, pid in lines] == [str(slow.pid), str(rescuer.pid)]
    job = _only_job(db)
    assert (job.state, job.attempts, job.lease_owner) == (JobState.DONE, 2, None)
    with db.session() as s:
        (run,) = s.query(AnalysisRun).all()
        assert run.provenance["steps"][0]["pid"] == rescuer.pid
        (expired,) = audit.events(s, EventType.JOB_LEASE_EXPIRED)
        assert f":{slow.pid}:" in expired.detail["error"] and not expired.detail["gave_up"]
    db.dispose()


@pytest.mark.parametrize("job_seconds, expected", [(600, JobState.QUEUED), (1, JobState.DONE)])
def test_sigterm_finishes_or_releases_the_current_job(
    sqlite_url: str, tmp_path: Path, job_seconds: float, expected: str
) -> None:
    """stop_seconds = 3: a 1 s job is finished, a 600 s job goes back to the queue."""
    db = Database(sqlite_url)
    analysed = tmp_path / "analysed.txt"
    w = WorkerProcess(
        tmp_path,
        sqlite_url,
        name="w",
        worker={"stop_seconds": 3},
        env={
            "SECONDREADER_TEST_ANALYSER_LOG": str(analysed),
            "SECONDREADER_TEST_ANALYSER_SLEEP": str(job_seconds),
        },
    ).start()
    try:
        w.wait_ready()
        queue_studies(db, 1)
        wait_for(lambda: analysed.exists() and analysed.read_text(), 30, "worker busy")
        w.signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert w.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 10
    finally:
        w.kill()
    job = _only_job(db)
    with db.session() as s:
        released = audit.events(s, EventType.JOB_RELEASED)
        runs = s.query(AnalysisRun).count()
    if expected == JobState.QUEUED:
        # Released: no attempt counted, no lease left, ready for the next worker now.
        assert (job.state, job.attempts, job.lease_owner, job.lease_expires_at) == (
            JobState.QUEUED,
            0,
            None,
            None,
        )
        assert (len(released), runs) == (1, 0)
    else:
        assert (job.state, job.attempts, len(released), runs) == (JobState.DONE, 1, 0, 1)
    assert "received SIGTERM" in w.log()
    db.dispose()


# -- end to end: `secondreader serve` with the built-in model -----------------

SPACING = (2.5, 1.4, 1.4)  # (slice, row, column) mm, as the phantom is drawn
# Phantoms the shipped model reads clearly (nodule: far above the threshold on the slice of its
# centre; clear: well below the threshold). Re-check them when the model is retrained.
LESION_SEED = 15
CLEAR_SEED = 10


def _ct_study(
    root: Path, seed: int, lesion: bool
) -> tuple[list[Path], tuple[int, int, int] | None]:
    volume, centre = phantom_volume(
        seed, n_slices=40, rows=256, cols=256, spacing=SPACING, lesion=lesion
    )
    return write_ct_series(volume, root, spacing=SPACING), centre


@pytest.mark.timeout(300)
def test_serve_analyses_received_studies(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    lesion_files, centre = _ct_study(tmp_path / "lesion", LESION_SEED, lesion=True)
    clear_files, _ = _ct_study(tmp_path / "clear", CLEAR_SEED, lesion=False)
    assert centre is not None
    mr_file = Path(get_testdata_file("MR_small.dcm"))
    uid_of = {p: dcmread(p, stop_before_pixels=True) for p in [*lesion_files, *clear_files]}
    lesion_study = uid_of[lesion_files[0]].StudyInstanceUID
    clear_study = uid_of[clear_files[0]].StudyInstanceUID
    mr_study = dcmread(mr_file, stop_before_pixels=True).StudyInstanceUID
    slice_of = {uid_of[p].SOPInstanceUID: k for k, p in enumerate(lesion_files)}

    d = daemon_factory('[worker]\ndevice = "cpu"\npoll_seconds = 0.2\n').start()
    sent = storescu(d.port, [*lesion_files, *clear_files, mr_file])
    assert sent.returncode == 0, sent.stderr
    db = Database(f"sqlite:///{d.state / 'secondreader.db'}")

    def finished() -> dict[str, str] | None:
        with db.session() as s:
            rows = s.query(Study.study_instance_uid, Job.state).join(Job).all()
        states = dict(rows)
        if len(states) == 3 and not {JobState.QUEUED, JobState.RUNNING} & set(states.values()):
            return states
        return None

    states = d.wait_for(finished, timeout=240)
    assert states == {
        lesion_study: JobState.DONE,
        clear_study: JobState.DONE,
        mr_study: JobState.NOT_APPLICABLE,
    }
    with db.session() as s:
        runs = {
            uid: run
            for run, uid in s.query(AnalysisRun, Study.study_instance_uid).join(
                Study, Study.id == AnalysisRun.study_id
            )
        }
        assert set(runs) == {lesion_study, clear_study, mr_study}
        (hit,) = runs[lesion_study].findings
        (miss,) = runs[clear_study].findings
        not_applicable = runs[mr_study]
        assert not_applicable.findings == []
        saliency = runs[lesion_study].saliency_path

    assert runs[lesion_study].outcome == runs[clear_study].outcome == "analysed"
    assert hit.present and hit.probability >= hit.threshold
    assert not miss.present and miss.probability < miss.threshold
    # Where: a slice near the nodule's centre, a point near it in that image.
    cz, cy, cx = centre
    assert hit.sop_instance_uid in slice_of
    assert abs(slice_of[hit.sop_instance_uid] - cz) <= 3
    assert hit.point is not None
    assert ((hit.point["col"] - cx) ** 2 + (hit.point["row"] - cy) ** 2) ** 0.5 <= 20
    assert saliency is not None and (d.state / saliency).is_file()

    with db.session() as s:
        recorded = {
            e.study_instance_uid: e.detail for e in audit.events(s, EventType.ANALYSIS_RECORDED)
        }
    steps = [step["name"] for step in recorded[lesion_study]["preprocessing"]]
    assert {"orientation", "resample", "denoise", "contrast"} <= set(steps)

    assert not_applicable.outcome == "not_applicable"
    assert not_applicable.reason is not None and "MR" in not_applicable.reason

    assert d.stop() == 0
    log = d.log()
    # Each model was loaded once for the three studies, and no patient name was logged.
    assert log.count("loaded model") == len(builtin_model_dirs())
    assert "Phantom" not in log and "SR-TEST-0001" not in log
    db.dispose()
