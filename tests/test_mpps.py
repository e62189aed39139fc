"""MPPS: a study completes when its modality says so, not after the quiet window.

The modality is the test, a pynetdicom MPPS SCU (the peer); the SCP is the
real daemon, its quiet window set to an hour so that only MPPS can complete a
study during the test. dcmtk's storescu sends the images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep
from sqlalchemy import select

from db import audit
from db.audit import EventType
from db.models import Instance, Series, Study
from db.session import Database
from tests.conftest import DaemonProcess, storescu
from tests.reportdata import ct_study

# Nothing but MPPS completes a study here; no worker, so nothing else runs.
QUIET_HOUR = {
    "SECONDREADER_COMPLETION__STABLE_SECONDS": "3600",
    "SECONDREADER_WORKER__IN_PROCESS": "false",
}


class Modality:
    """An MPPS SCU over one association."""

    def __init__(self, port: int) -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ModalityPerformedProcedureStep)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="SECONDREADER")
        assert self.assoc.is_established

    def create(self, uid: str, study_uid: str) -> int:
        ds = Dataset()
        item = Dataset()
        item.StudyInstanceUID = study_uid
        item.AccessionNumber = ""
        item.RequestedProcedureID = ""
        item.ScheduledProcedureStepID = ""
        ds.ScheduledStepAttributesSequence = [item]
        ds.PatientName = "Mpps^Test"
        ds.PatientID = "MPPS-0001"
        ds.PerformedProcedureStepID = "1"
        ds.PerformedStationAETitle = "MODALITY"
        ds.PerformedProcedureStepStartDate = "20261202"
        ds.PerformedProcedureStepStartTime = "120000"
        ds.PerformedProcedureStepStatus = "IN PROGRESS"
        ds.Modality = "CT"
        ds.PerformedSeriesSequence = []
        status, _ = self.assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)
        return int(status.Status)

    def finish(self, uid: str, files: list[Path], status: str = "COMPLETED") -> int:
        headers = [dcmread(f, stop_before_pixels=True) for f in files]
        series = Dataset()
        series.SeriesInstanceUID = headers[0].SeriesInstanceUID if headers else generate_uid()
        series.ReferencedImageSequence = []
        for h in headers:
            ref = Dataset()
            ref.ReferencedSOPClassUID = h.SOPClassUID
            ref.ReferencedSOPInstanceUID = h.SOPInstanceUID
            series.ReferencedImageSequence.append(ref)
        series.PerformingPhysicianName = ""
        series.ProtocolName = "CHEST"
        series.OperatorsName = ""
        series.SeriesDescription = ""
        series.RetrieveAETitle = ""
        series.ReferencedNonImageCompositeSOPInstanceSequence = []
        mod = Dataset()
        mod.PerformedProcedureStepStatus = status
        mod.PerformedProcedureStepEndDate = "20261202"
        mod.PerformedProcedureStepEndTime = "120500"
        mod.PerformedSeriesSequence = [series]
        rsp, _ = self.assoc.send_n_set(mod, ModalityPerformedProcedureStep, uid)
        return int(rsp.Status)

    def close(self) -> None:
        self.assoc.release()


def study(d: DaemonProcess, uid: str) -> Any:
    db = Database(f"sqlite:///{d.state / 'secondreader.db'}")
    try:
        with db.session() as s:
            row = s.scalars(select(Study).where(Study.study_instance_uid == uid)).one_or_none()
            if row is None:
                return None
            last = s.scalars(
                select(Instance.received_at)
                .join(Series)
                .where(Series.study_id == row.id)
                .order_by(Instance.received_at.desc())
            ).first()
            completions = [
                e.detail
                for e in audit.events(s, EventType.STUDY_COMPLETED)
                if e.study_instance_uid == uid
            ]
            return row.state, row.completed_at, last, completions
    finally:
        db.dispose()


def uid_of(files: list[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def test_completed_mpps_completes_the_study_at_its_last_instance(
    daemon_factory, tmp_path: Path
) -> None:
    d = daemon_factory(env=QUIET_HOUR).start()
    modality = Modality(d.port)
    files = ct_study(tmp_path / "a", slices=12, seed=1)
    step = generate_uid()
    assert modality.create(step, uid_of(files)) == 0x0000
    # The N-SET comes before the last image has arrived (PACS-forwarded
    # images often lag the modality's report).
    assert storescu(d.port, files[:-1]).returncode == 0
    assert modality.finish(step, files) == 0x0000
    assert study(d, uid_of(files))[0] == "receiving"  # one listed instance is missing
    assert storescu(d.port, files[-1:]).returncode == 0

    state, completed_at, last, completions = d.wait_for(
        lambda: (found := study(d, uid_of(files))) and found[0] == "complete" and found,
        timeout=60,
    )
    assert completions == [
        {"instances": 12, "forced": False, "by": "mpps"}
    ]  # once, with all 12, by MPPS
    # Without the hour-long quiet window: bench/e2e.py measures how much sooner.
    assert (completed_at - last).total_seconds() < 60
    # A step is final once COMPLETED.
    assert modality.finish(step, files, "DISCONTINUED") == 0xA710
    modality.close()
    assert d.stop() == 0


def test_discontinued_or_incomplete_steps_leave_the_study_to_the_quiet_window(
    daemon_factory, tmp_path: Path
) -> None:
    d = daemon_factory(env=QUIET_HOUR).start()
    modality = Modality(d.port)
    discontinued = ct_study(tmp_path / "discontinued", slices=6, seed=2)
    missing = ct_study(tmp_path / "missing", slices=7, seed=3)
    control = ct_study(tmp_path / "control", slices=6, seed=4)
    steps = {name: generate_uid() for name in ("discontinued", "missing", "control")}
    for name, files in (("discontinued", discontinued), ("missing", missing),
                        ("control", control)):  # fmt: skip
        assert modality.create(steps[name], uid_of(files)) == 0x0000
    assert storescu(d.port, discontinued + missing[:-1] + control).returncode == 0
    assert modality.finish(steps["discontinued"], discontinued, "DISCONTINUED") == 0x0000
    assert modality.finish(steps["missing"], missing) == 0x0000  # lists one not sent
    # The control study completes by MPPS; the completer looked at all three
    # steps in that pass or before (their N-SETs came first).
    assert modality.finish(steps["control"], control) == 0x0000
    d.wait_for(lambda: study(d, uid_of(control))[0] == "complete", timeout=60)
    assert study(d, uid_of(discontinued))[0] == "receiving"
    assert study(d, uid_of(missing))[0] == "receiving"
    # The missing instance arrives: now its study completes.
    assert storescu(d.port, missing[-1:]).returncode == 0
    d.wait_for(lambda: study(d, uid_of(missing))[0] == "complete", timeout=60)
    assert study(d, uid_of(discontinued))[0] == "receiving"

    # Protocol errors get their DIMSE status, and the association goes on.
    assert modality.finish(generate_uid(), control) == 0x0112  # no such step
    assert modality.create(steps["control"], uid_of(control)) == 0x0111  # duplicate
    modality.close()
    assert "Mpps^Test" not in d.log() and "MPPS-0001" not in d.log()
    assert d.stop() == 0
