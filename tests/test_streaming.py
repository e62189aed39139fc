"""Streaming: images analysed as they arrive give the findings of an analysis after completion.

The first two tests drive the real stages in-process (the streamer's
database query and read-ahead, the worker, the report stage) with the
built-in CT model, one step at a time: no timing decides what is read
ahead. The last one is the real `secondreader serve`, SIGKILLed while it
streams a study that storescu is sending.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from daemon.config import Config
from daemon.memory import TUNABLES
from daemon.stages.analyse.analyser import ModelAnalyser
from daemon.stages.analyse.stream import Streamer
from daemon.stages.analyse.worker import Worker
from daemon.stages.report import Reporter
from db import migrate
from db.models import AnalysisRun, Instance, utcnow
from db.reports import load_pending_run
from db.session import Database
from db.studies import complete_stable_studies
from dicom_io.synthetic import write_ct_series
from model.phantom import phantom_volume
from model.results import AnalysisResult, Outcome
from tests import reportdata as rd
from tests.conftest import storescu
from tests.test_mpps import Modality
from tests.test_report_stage import make_config

SPACING = (2.5, 1.4, 1.4)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'stream.db'}"
    migrate.upgrade(url)
    return url


def chest_ct(folder: Path, *, slices: int = 40) -> list[Path]:
    """A phantom chest CT with a nodule, 256x256: what the built-in CT model is for."""
    volume, _ = phantom_volume(5, n_slices=slices, rows=256, cols=256, lesion=True,
                               spacing=SPACING)  # fmt: skip
    return write_ct_series(volume, folder, spacing=SPACING, seed=5)


def complete(db: Database) -> None:
    """The quiet window of 1 ms, over: the study is whole, its job due now."""
    time.sleep(0.01)
    with db.session() as s:
        done = complete_stable_studies(s, stable_seconds=0.001, max_seconds=3600, now=utcnow())
    assert len(done) == 1


def runs(db: Database) -> list[AnalysisRun]:
    with db.session() as s:
        return list(s.scalars(select(AnalysisRun).order_by(AnalysisRun.id)))


def step(run: AnalysisRun, name: str) -> dict:
    return next(p for p in run.provenance["steps"] if p["name"] == name)


def stages(config: Config, db: Database) -> tuple[ModelAnalyser, Streamer, Worker]:
    analyser = ModelAnalyser(None, device="cpu")
    streamer = Streamer(db, analyser, config.worker, spool_dir=config.storage.spool_dir)
    worker = Worker(db, lambda: analyser, config.worker, spool_dir=config.storage.spool_dir,
                    state_dir=config.storage.state_dir)  # fmt: skip
    return analyser, streamer, worker


def spool_files(config: Config, db: Database) -> dict[str, list[Path]]:
    """The study's files as the worker is given them, for an analysis after completion."""
    with db.session() as s:
        paths = s.scalars(select(Instance.path).order_by(Instance.id)).all()
    return {"series": [config.storage.spool_dir / p for p in paths]}


def assert_same_findings(streamed: AnalysisResult, reference: AnalysisResult) -> None:
    assert streamed.outcome == reference.outcome == Outcome.ANALYSED
    assert len(streamed.findings) == len(reference.findings) == 1
    for a, b in zip(streamed.findings, reference.findings, strict=True):
        assert a.probability == pytest.approx(b.probability, abs=1e-6)
        assert a.location is not None and b.location is not None
        assert a.location.sop_instance_uid == b.location.sop_instance_uid
        assert a.location.point == pytest.approx(b.location.point, abs=1e-6)
        assert a.location.box == pytest.approx(b.location.box, abs=1e-6)
    assert streamed.saliency is not None and reference.saliency is not None
    assert streamed.saliency.source_sop_instance_uids == reference.saliency.source_sop_instance_uids
    assert np.allclose(streamed.saliency.frames, reference.saliency.frames, atol=1e-6)


def test_images_out_of_order_with_a_pause_give_the_findings_of_the_whole_study(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = make_config(tmp_path, sqlite_url)
    db = Database(config.database_url)
    files = chest_ct(tmp_path / "ct")
    order = list(files)
    random.Random(3).shuffle(order)  # a modality's order is not slice order
    _, streamer, worker = stages(config, db)

    rd.receive(db, config.storage.spool_dir, order[:22])
    assert streamer.run_once()
    assert not streamer.run_once()  # the pause: nothing new arrives
    rd.receive(db, config.storage.spool_dir, order[22:34])
    assert streamer.run_once()
    rd.receive(db, config.storage.spool_dir, order[34:])  # the last six, not read ahead
    complete(db)
    assert not streamer.run_once()  # a complete study is not read ahead
    assert streamer.prepared == 34
    assert worker.run_once()

    (run,) = runs(db)
    assert run.outcome == Outcome.ANALYSED
    assert step(run, "inference")["parameters"]["computed_while_receiving"] == 34
    assert step(run, "slice by slice")["parameters"]["prepared_while_receiving"] == 34
    streamed = run_result(db, run, config.storage.state_dir)
    # The same spool files, analysed only after completion by a fresh worker's models.
    (reference,) = ModelAnalyser(None, device="cpu").analyse(
        streamed.study_instance_uid, spool_files(config, db)
    )
    assert_same_findings(streamed, reference)
    db.dispose()


def run_result(db: Database, run: AnalysisRun, state_dir: Path) -> AnalysisResult:
    """The run as recorded, read back as the report stage reads it."""
    with db.session() as s:
        pending = load_pending_run(s, run.id, state_dir=state_dir, saliency=True)
    assert pending is not None
    return pending.result


def test_a_late_image_reopens_the_study_its_new_analysis_supersedes_the_sr(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = make_config(tmp_path, sqlite_url)
    db = Database(config.database_url)
    files = chest_ct(tmp_path / "ct")
    positions = {f: float(dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
                 for f in files}  # fmt: skip
    by_position = sorted(files, key=positions.__getitem__)
    late = by_position[-1]  # the last slice comes after the result
    _, streamer, worker = stages(config, db)
    reporter = Reporter(db, config)

    rd.receive(db, config.storage.spool_dir, by_position[:-1])
    assert streamer.run_once()
    complete(db)
    assert worker.run_once()
    assert reporter.run_once() == 1
    first = runs(db)[0]
    assert step(first, "inference")["parameters"]["slices"] == len(files) - 1

    rd.receive(db, config.storage.spool_dir, [late])
    streamer.run_once()
    complete(db)
    assert worker.run_once()
    assert reporter.run_once() == 1
    _, second = runs(db)
    # Analysed again, on every image received, the late one included.
    assert step(second, "inference")["parameters"]["slices"] == len(files)
    assert second.sr_sop_instance_uid not in (None, first.sr_sop_instance_uid)
    study_uid = str(dcmread(late, stop_before_pixels=True).StudyInstanceUID)
    sr = dcmread(config.storage.state_dir / f"outbox/{study_uid}/{second.sr_sop_instance_uid}.dcm")
    (predecessor,) = sr.PredecessorDocumentsSequence
    refs = [r for s in predecessor.ReferencedSeriesSequence for r in s.ReferencedSOPSequence]
    assert [r.ReferencedSOPInstanceUID for r in refs] == [first.sr_sop_instance_uid]
    db.dispose()


def test_sigkill_while_streaming_loses_no_acknowledged_image_and_reports_nothing_partial(
    tmp_path: Path, daemon_factory
) -> None:
    files = chest_ct(tmp_path / "ct", slices=60)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    # Only the modality's MPPS completes the study: the quiet window is an hour.
    daemon = daemon_factory(env={
        "SECONDREADER_WORKER__DEVICE": "cpu",
        "SECONDREADER_COMPLETION__STABLE_SECONDS": "3600",
        "SECONDREADER_WORKER__POLL_SECONDS": "0.3",
    }).start()  # fmt: skip
    # serve re-ran itself once, same process, with the allocator settings that
    # keep a worker's memory warm between studies (daemon/memory.py).
    assert daemon.proc is not None
    environ = Path(f"/proc/{daemon.proc.pid}/environ").read_bytes().split(b"\0")
    assert b"SECONDREADER_MALLOC_TUNED=1" in environ
    # glibc parses the variable in place: the first of our settings is what shows.
    first = TUNABLES.split(":")[0]
    assert any(e.startswith(f"GLIBC_TUNABLES={first}".encode()) for e in environ)
    step_uid = generate_uid()
    modality = Modality(daemon.port)
    assert modality.create(step_uid, study_uid) == 0
    modality.close()
    first, second = files[:30], files[30:]
    assert storescu(daemon.port, first).returncode == 0  # every image acknowledged
    daemon.wait_for(lambda: f"study {study_uid}: analysing its images as they arrive"
                    in daemon.log(), timeout=120)  # fmt: skip
    daemon.kill()  # SIGKILL while the study is still arriving

    db = Database(f"sqlite:///{daemon.state / 'secondreader.db'}")
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == len(first)
        assert s.scalar(select(func.count()).select_from(AnalysisRun)) == 0  # nothing partial

    daemon.start()
    assert storescu(daemon.port, second).returncode == 0
    modality = Modality(daemon.port)
    assert modality.finish(step_uid, files) == 0
    modality.close()
    daemon.wait_for(lambda: len(runs(db)) == 1, timeout=180)
    (run,) = runs(db)
    assert run.outcome == Outcome.ANALYSED
    # The whole study, from the spool: what was read ahead before the kill was lost with
    # the process, and nothing of it was reported.
    assert step(run, "inference")["parameters"]["slices"] == len(files)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == len(files)
    assert daemon.stop() == 0
    db.dispose()
