"""Stage 5, report: each analysis run becomes DICOM objects queued for the PACS.

For a pending run: read its result back from the database, the headers of
its images from the spool, build the SR (TID 1500, or "AI not run" with the
reason) and, for an analysed run with a present finding, the saliency SEG;
write them under <state_dir>/outbox/<study>/<uid>.dcm and, in one
transaction, queue one outbox row per object per destination and mark the
run reported. The deliver stage (daemon/dispatcher.py) takes it from there.

A re-run of the same model on the same study supersedes the earlier SR:
the new one lists it in its Predecessor Documents Sequence.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from daemon.config import Config
from db.models import DeliveryState
from db.outbox import NewOutboxItem
from db.reports import (
    PendingRun,
    load_pending_run,
    pending_run_ids,
    record_report,
    record_report_failure,
)
from db.session import Database
from dicom_io.headers import UNKNOWN_MODALITY, read_header
from dicom_io.identify import valid_uid
from dicom_io.seg import build_saliency_seg
from dicom_io.spool import Spool
from dicom_io.sr import (
    build_ai_result_sr,
    build_not_run_sr,
    finding_tracking_uid,
    read_findings,
)
from dicom_io.text import printable, safe_error, scrub_values
from model.results import Finding, Outcome

log = logging.getLogger(__name__)

OUTBOX_DIR = "outbox"


class ReportError(Exception):
    """This run's report cannot be built; retrying would not help."""


@dataclass(frozen=True)
class BuiltObject:
    kind: str  # "sr" or "seg"
    dataset: Dataset


class Reporter:
    def __init__(self, db: Database, config: Config) -> None:
        self.db = db
        self.config = config
        self.state_dir = config.storage.state_dir
        self.spool_dir = config.storage.spool_dir
        # The spool's atomic write (temporary file, fsync, rename), rooted at
        # the outbox: a crash never leaves half an SR under its real name.
        self.outbox = Spool(self.state_dir / OUTBOX_DIR, fsync=config.storage.fsync)

    def run_once(self) -> int:
        """Report every pending run; returns how many were reported."""
        with self.db.session() as s:
            run_ids = pending_run_ids(s)
        return sum(self.report(run_id) for run_id in run_ids)

    def report(self, run_id: int) -> bool:
        try:
            with self.db.session() as s:
                run = load_pending_run(s, run_id, state_dir=self.state_dir)
        except (OSError, ValueError) as exc:
            # Its saliency file is missing or unreadable, or its rows are invalid.
            self._fail(run_id, None, f"cannot read the run back: {safe_error(exc)}")
            return False
        if run is None:
            return False
        study_uid = run.result.study_instance_uid
        try:
            headers = self._headers(run)
            objects = self._build(run, headers)
        except ReportError as exc:
            self._fail(run_id, study_uid, str(exc))
            return False
        except Exception as exc:
            # Builders are deterministic: the same rows fail the same way on
            # every tick, so retrying would not help. The radiologist still
            # gets an SR: one that says the AI result could not be encoded.
            error = safe_error(exc)
            log.error("run %d: the AI result SR could not be built: %s", run_id, error)
            log.debug("run %d traceback", run_id, exc_info=exc)
            try:
                objects = [self._not_run(run, headers, self._encoding_failure(error))]
            except Exception as again:
                log.debug("run %d traceback", run_id, exc_info=again)
                self._fail(run_id, study_uid, f"{error}; not-run SR: {safe_error(again)}")
                return False
        # Files first, rows second: a crash in between leaves files that the
        # next pass overwrites (the UIDs are derived from the run), never a
        # queued row without its file.
        queued: list[NewOutboxItem] = []
        # An AI result with findings waits for the physician at destinations
        # that take reviewed results only; "AI not run" has nothing to review.
        reviewable = any(o.kind == "sr" and read_findings(o.dataset) for o in objects)
        for obj in objects:
            relative = self._write(study_uid, obj.dataset)
            for dest in self.config.delivery.destinations:
                held = reviewable and dest.release == "after_review"
                queued.append(
                    NewOutboxItem(
                        study_id=run.study_id,
                        run_id=run.run_id,
                        object_kind=obj.kind,
                        sop_class_uid=str(obj.dataset.SOPClassUID),
                        sop_instance_uid=str(obj.dataset.SOPInstanceUID),
                        path=relative,
                        destination=dest.name,
                        state=DeliveryState.HELD if held else DeliveryState.PENDING,
                    )
                )
        sr = next(o.dataset for o in objects if o.kind == "sr")
        tracking = {}
        if run.result.algorithm is not None:
            for finding_id, finding in zip(run.finding_ids, run.result.findings, strict=True):
                tracking[finding_id] = finding_tracking_uid(
                    study_uid, run.result.algorithm.device_uid, finding.label
                )
        with self.db.session() as s:
            done = record_report(
                s,
                run,
                sr_sop_instance_uid=str(sr.SOPInstanceUID),
                tracking_uids=tracking,
                objects=queued,
            )
        if done:
            log.info(
                "run %d (study %s, %s): %s queued for %d destination(s)",
                run.run_id,
                study_uid,
                run.result.outcome,
                " + ".join(o.kind.upper() for o in objects),
                len(self.config.delivery.destinations),
            )
        return done

    # -- building ----------------------------------------------------------
    @staticmethod
    def _encoding_failure(error: str) -> str:
        return f"the AI result could not be written as a DICOM SR ({error})"

    def _common(self, run: PendingRun) -> dict[str, Any]:
        cfg = self.config.report
        return {
            "series_number": cfg.series_number,
            "series_instance_uid": self._uid(run, "sr-series"),
            "sop_instance_uid": self._uid(run, "sr"),
            "manufacturer": cfg.manufacturer,
            "manufacturer_model_name": cfg.manufacturer_model_name,
            "institution_name": cfg.institution_name,
            "institutional_department_name": cfg.institutional_department_name,
            "predecessor": self._predecessor(run),
        }

    def _not_run(self, run: PendingRun, headers: list[Dataset], reason: str) -> BuiltObject:
        result = run.result
        outcome = result.outcome if result.outcome != Outcome.ANALYSED else Outcome.FAILED
        sr = build_not_run_sr(
            headers,
            reason,
            result.algorithm,
            outcome=outcome,
            series_description=self.config.report.not_run_series_description,
            **self._common(run),
        )
        return BuiltObject("sr", sr)

    def _build(self, run: PendingRun, headers: list[Dataset]) -> list[BuiltObject]:
        result = run.result
        cfg = self.config.report
        if result.outcome != Outcome.ANALYSED:
            return [self._not_run(run, headers, result.reason or f"outcome: {result.outcome}")]
        seg = self._seg(run, headers) if cfg.segmentation else None
        sr = build_ai_result_sr(
            result,
            headers,
            series_description=cfg.series_description,
            segmentation=seg,
            **self._common(run),
        )
        # The SEG first: the SR lists it as evidence, so it should be there first.
        return [*([BuiltObject("seg", seg)] if seg is not None else []), BuiltObject("sr", sr)]

    def _seg(self, run: PendingRun, headers: list[Dataset]) -> Dataset | None:
        """The saliency map as a SEG for the run's most probable present finding.

        None when there is no map, or no finding is present: like the SR,
        which draws no region for an absent finding, we do not show a heat
        map that invites a look for something the model says is not there.
        The map of a multi-label model mixes labels slice by slice
        (model/inference.py); the top finding is what it mostly shows.
        """
        result = run.result
        present = [f for f in result.findings if f.present]
        if result.saliency is None or result.algorithm is None or not present:
            return None
        top: Finding = max(present, key=lambda f: f.probability)
        cfg = self.config.report
        try:
            return build_saliency_seg(
                result.saliency,
                headers,
                result.algorithm,
                top,
                series_number=cfg.seg_series_number,
                series_description=cfg.seg_series_description,
                series_instance_uid=self._uid(run, "seg-series"),
                sop_instance_uid=self._uid(run, "seg"),
                manufacturer=cfg.manufacturer,
                manufacturer_model_name=cfg.manufacturer_model_name,
            )
        except Exception as exc:
            # The SR carries the findings; a map that does not fit its images
            # (or is empty, or headers highdicom will not take) must not hold them back.
            log.warning("run %d: no saliency SEG: %s", run.run_id, safe_error(exc))
            return None

    def _headers(self, run: PendingRun) -> list[Dataset]:
        """The source headers, repaired (dicom_io/headers.py): real images lack Type 2
        attributes, even Modality, and carry malformed values."""
        if not run.source_paths:
            raise ReportError("no images of the study are recorded")
        raw = []
        for relative in run.source_paths:
            path = self.spool_dir / relative
            try:
                raw.append(read_header(path))
            except FileNotFoundError as exc:
                raise ReportError(f"image missing from the spool: {relative}") from exc
            except Exception as exc:
                raise ReportError(f"image unreadable in the spool: {relative}") from exc
        # An image without Modality takes its series' (the first that has one).
        modality = next((str(h.Modality) for h in raw if h.get("Modality") != "OT"), None)
        if modality is not None:
            for h in raw:
                if h.Modality == UNKNOWN_MODALITY and modality != UNKNOWN_MODALITY:
                    h.Modality = modality
        return raw

    def _predecessor(self, run: PendingRun) -> Dataset | None:
        uid = run.predecessor_sr_uid
        if uid is None:
            return None
        path = self.outbox.root / self._relative(run.result.study_instance_uid, uid)
        try:
            return dcmread(path, stop_before_pixels=True)
        except FileNotFoundError:
            # The new SR still stands on its own; only the link is lost.
            log.warning("run %d: earlier SR %s not in the outbox; not referenced", run.run_id, uid)
            return None

    @staticmethod
    def _uid(run: PendingRun, kind: str) -> str:
        # Derived from the run, not random: rebuilding after a crash before the
        # rows were committed gives the same objects, not a second set.
        return str(
            generate_uid(
                entropy_srcs=[
                    "secondreader-report",
                    run.result.study_instance_uid,
                    str(run.run_id),
                    run.created_at.isoformat(),
                    kind,
                ]
            )
        )

    # -- files ---------------------------------------------------------------
    @staticmethod
    def _relative(study_uid: str, sop_uid: str) -> str:
        if not (valid_uid(study_uid) and valid_uid(sop_uid)):
            raise ReportError("not a valid UID; refusing to build an outbox path from it")
        return f"{study_uid}/{sop_uid}.dcm"

    def _write(self, study_uid: str, ds: Dataset) -> str:
        """Atomically write the object; returns its path relative to the state directory."""
        relative = self._relative(study_uid, str(ds.SOPInstanceUID))
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        self.outbox.write(relative, buf.getvalue())
        return f"{OUTBOX_DIR}/{relative}"

    def _fail(self, run_id: int, study_uid: str | None, error: str) -> None:
        error = printable(scrub_values(error), limit=4000)
        log.error("report of run %d failed: %s", run_id, error)
        with self.db.session() as s:
            record_report_failure(s, run_id, study_uid, error)
