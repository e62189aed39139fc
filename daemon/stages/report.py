"""Stage 5, report: each analysis run becomes DICOM objects queued for the PACS.

For a pending run: read its result back from the database, the headers of
its images from the spool, and build the objects the destinations take
(`outputs`): the SR (TID 1500, or "AI not run" with the reason), the summary
Secondary Capture (every study), and for an analysed run with a present
finding the saliency as a Parametric Map, FRACTIONAL SEG or BINARY SEG and
the GSPS on the key image. Write them under <state_dir>/outbox/<study>/<uid>.dcm
and, in one transaction, queue one outbox row per object per destination that
takes its kind, and mark the run reported. The deliver stage
(daemon/stages/deliver.py) takes it from there.

A re-run of the same model on the same study supersedes the earlier SR:
the new one lists it in its Predecessor Documents Sequence.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from daemon.config import DEFAULT_OUTPUTS, EXTRA_KINDS, Config
from db.governance import current_mode
from db.layout import OUTBOX_DIR
from db.models import DeliveryState, ModelMode, ReviewSelection
from db.outbox import NewOutboxItem
from db.reports import (
    Governed,
    PendingRun,
    extras_run_ids,
    is_verified,
    load_pending_run,
    pending_run_ids,
    record_extras,
    record_extras_skipped,
    record_report,
    record_report_failure,
    record_withheld,
)
from db.session import Database
from dicom_io.headers import UNKNOWN_MODALITY, read_header
from dicom_io.identify import valid_uid
from dicom_io.pixels import read_modality_pixels
from dicom_io.pmap import build_saliency_map
from dicom_io.pr import build_presentation_state
from dicom_io.seg import build_region_seg, build_saliency_seg, build_segmentation_seg
from dicom_io.spool import Spool
from dicom_io.sr import (
    build_ai_result_sr,
    build_not_run_sr,
    finding_tracking_uid,
)
from dicom_io.summary import (
    build_summary_image,
    render_negative,
    render_not_run,
    render_positive,
)
from dicom_io.text import printable, safe_error, scrub_values
from model.results import Finding, ImageLocation, Outcome

log = logging.getLogger(__name__)



def _draw(study_instance_uid: str, model_name: str) -> float:
    """A number in [0, 1) fixed by the study and the model."""
    digest = hashlib.sha256(f"{study_instance_uid}|{model_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class ReportError(Exception):
    """This run's report cannot be built; retrying would not help."""


@dataclass(frozen=True)
class BuiltObject:
    kind: str  # one of daemon.config.OUTPUT_KINDS
    dataset: Dataset


class Reporter:
    def __init__(self, db: Database, config: Config) -> None:
        self.db = db
        self.config = config
        self.state_dir = config.storage.state_dir
        self.spool_dir = config.storage.spool_dir
        # The spool's atomic write (temporary file, fsync, rename), rooted at
        # the outbox: a crash never leaves half an SR under its real name.
        self.outbox = Spool(config.storage.layout.outbox, fsync=config.storage.fsync)
        # Called after each pass queues objects: the deliver stage's wake-up.
        self.on_queued: Callable[[], None] | None = None

    @staticmethod
    def warm_up() -> None:
        """Load what highdicom reads once per process, before the first study needs it.

        highdicom parses the standard's module tables (JSON, half a second on
        one core) the first time an SR checks an attribute against its IOD:
        without this, the first result after a restart reaches the PACS that
        much later. Only speed is at stake: if highdicom moves these, skip.
        """
        try:
            from highdicom import _standard_utils as standard
        except ImportError:
            return
        for name in (
            "get_sop_class_iod_map",
            "get_iod_module_map",
            "get_module_attribute_map",
            "get_anatomic_region_map",
        ):
            loader = getattr(standard, name, None)
            if callable(loader):
                try:
                    loader()
                except Exception as exc:  # the first SR then loads it, as before
                    log.debug("highdicom %s not preloaded: %s", name, exc)

    def run_once(self) -> int:
        """Both passes over every pending run; returns how many runs were reported.

        First pass: the SR (and the SEG it cites) of every pending run is
        built and queued, so that delivery starts at once (`on_queued`).
        Second pass: the other objects (parametric map, BINARY SEG, GSPS,
        summary), which take seconds for a large series, follow.
        """
        with self.db.session() as s:
            run_ids = pending_run_ids(s)
        done = sum(self.report(run_id) for run_id in run_ids)
        with self.db.session() as s:
            extra_ids = extras_run_ids(s)
        for run_id in extra_ids:
            self.report_extras(run_id)
        return done

    def report(self, run_id: int) -> bool:
        # The SR pass needs the saliency map and every image's header only
        # for a SEG beside it; otherwise it reads neither (seconds for a
        # 300-slice series, all before the SR can leave).
        with_seg = self.config.report.segmentation and "seg" in self._wanted()
        try:
            with self.db.session() as s:
                run = load_pending_run(s, run_id, state_dir=self.state_dir, saliency=with_seg)
        except (OSError, ValueError) as exc:
            # Its saliency file is missing or unreadable, or its rows are invalid.
            self._fail(run_id, None, f"cannot read the run back: {safe_error(exc)}")
            return False
        if run is None:
            return False
        rules = self._govern(run)
        study_uid = run.result.study_instance_uid
        if rules.mode == ModelMode.SILENT:
            with self.db.session() as s:
                done = record_withheld(s, run, rules)
            if done:
                log.info("run %d (study %s): silent model version, recorded only",
                         run.run_id, study_uid)  # fmt: skip
            return done
        fallback = False
        try:
            # A segmentation's SEG lies on every image its regions reach.
            headers = self._headers(run, light=not with_seg and run.result.label_map is None)
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
                fallback = True  # no map or picture of a result the SR could not carry
            except Exception as again:
                log.debug("run %d traceback", run_id, exc_info=again)
                self._fail(run_id, study_uid, f"{error}; not-run SR: {safe_error(again)}")
                return False
        # An AI result with findings waits for the physician at destinations
        # that take reviewed results only; "AI not run" has nothing to review.
        # The AI result SR always has findings (its builder refuses a result
        # without); the not-run SR (fallback included) has none.
        reviewable = run.result.outcome == Outcome.ANALYSED and not fallback
        # A review-only version's objects are written for the reviewers, sent nowhere.
        to_pacs = rules.mode != ModelMode.REVIEW_ONLY
        unread = rules.selection == ReviewSelection.UNSAMPLED_NEGATIVE
        queued = self._queue(run, objects, reviewable, unread=unread, send=to_pacs)
        sr = next(o.dataset for o in objects if o.kind == "sr")
        tracking = {}
        if run.result.algorithm is not None:
            for finding_id, finding in zip(run.finding_ids, run.result.findings, strict=True):
                tracking[finding_id] = finding_tracking_uid(
                    study_uid, run.result.algorithm.device_uid, finding.key
                )
        with self.db.session() as s:
            done = record_report(
                s,
                run,
                sr_sop_instance_uid=str(sr.SOPInstanceUID),
                tracking_uids=tracking,
                objects=queued,
                extras_pending=to_pacs and not fallback and bool(self._wanted() & EXTRA_KINDS),
                governance=rules,
            )
        if done and self.on_queued is not None:
            self.on_queued()
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

    def report_extras(self, run_id: int) -> bool:
        """The second pass for one run: its other objects, built and queued."""
        try:
            with self.db.session() as s:
                run = load_pending_run(s, run_id, state_dir=self.state_dir, extras=True)
                verified = is_verified(s, run_id)
        except (OSError, ValueError) as exc:
            # Its saliency file went missing: the SR is out; the rest cannot be.
            log.warning("run %d: no objects beside the SR: %s", run_id, safe_error(exc))
            run, verified = None, False
            with self.db.session() as s:
                record_extras_skipped(s, run_id)
        if run is None:
            return False
        try:
            headers = self._headers(run)
            objects = self._build_extras(run, headers)
        except Exception as exc:
            log.warning("run %d: no objects beside the SR: %s", run_id, safe_error(exc))
            log.debug("run %d traceback", run_id, exc_info=exc)
            objects = []
        reviewable = run.result.outcome == Outcome.ANALYSED and bool(run.result.findings)
        unread = run.review_selection == ReviewSelection.UNSAMPLED_NEGATIVE
        queued = self._queue(run, objects, reviewable, verified=verified, unread=unread)
        with self.db.session() as s:
            done = record_extras(s, run, queued)
        if done and objects:
            if self.on_queued is not None:
                self.on_queued()
            log.info(
                "run %d (study %s): %s queued",
                run.run_id, run.result.study_instance_uid,
                " + ".join(o.kind.upper() for o in objects),
            )  # fmt: skip
        return done

    def _govern(self, run: PendingRun) -> Governed:
        """The model version's mode now, and whether an AI-negative result is drawn for review.

        The draw is a hash of the study and model, not a coin: a re-run of a
        study keeps its place (in or out of the worklist), and a test's
        stream gives the same sample every time. Positives always go to the
        worklist; the negatives drawn estimate sensitivity and NPV
        (daemon/stages/monitor/performance.py).
        """
        algo = run.result.algorithm
        cfg = self.config.monitoring
        if algo is None:
            return Governed()
        with self.db.session() as s:
            mode = current_mode(s, algo.name, algo.version, cfg.default_mode)
        if run.result.outcome != Outcome.ANALYSED:
            return Governed(mode=mode)
        if any(f.present for f in run.result.findings):
            return Governed(mode, ReviewSelection.POSITIVE, cfg.negative_sample_fraction)
        drawn = _draw(run.result.study_instance_uid, algo.name) < cfg.negative_sample_fraction
        return Governed(
            mode,
            ReviewSelection.SAMPLED_NEGATIVE if drawn else ReviewSelection.UNSAMPLED_NEGATIVE,
            cfg.negative_sample_fraction,
        )

    def _queue(
        self,
        run: PendingRun,
        objects: list[BuiltObject],
        reviewable: bool,
        *,
        verified: bool = False,
        unread: bool = False,
        send: bool = True,
    ) -> list[NewOutboxItem]:
        """Write each object, and the outbox rows of the destinations that take its kind.

        Files first, rows second: a crash in between leaves files that the
        next pass overwrites (the UIDs are derived from the run), never a
        queued row without its file. An object of a reviewable result is held
        at an `after_review` destination; one built after the review was
        decided (`verified`) follows the decision's release at once. An AI
        negative left out of the review sample (`unread`) will never be
        verified: an `after_review` destination never gets it. Without `send`
        (a review-only version) the files are written for the review page and
        no row is queued.
        """
        queued: list[NewOutboxItem] = []
        for obj in objects:
            relative = self._write(run.result.study_instance_uid, obj.dataset)
            for dest in self.config.delivery.destinations if send else ():
                if obj.kind not in dest.outputs:
                    continue
                state = DeliveryState.PENDING
                if reviewable and dest.release == "after_review":
                    if unread:
                        state = DeliveryState.WITHHELD
                    elif not verified:
                        state = DeliveryState.HELD
                    elif not dest.send_ai_result_after_review:
                        state = DeliveryState.WITHHELD
                queued.append(
                    NewOutboxItem(
                        study_id=run.study_id,
                        run_id=run.run_id,
                        object_kind=obj.kind,
                        sop_class_uid=str(obj.dataset.SOPClassUID),
                        sop_instance_uid=str(obj.dataset.SOPInstanceUID),
                        path=relative,
                        destination=dest.name,
                        state=state,
                    )
                )
        return queued

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

    def _wanted(self) -> set[str]:
        """The object kinds some destination takes (all defaults without destinations)."""
        destinations = self.config.delivery.destinations
        if not destinations:
            return set(DEFAULT_OUTPUTS)  # built into the outbox, for a look
        return {kind for dest in destinations for kind in dest.outputs}

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
        wanted = self._wanted()
        if result.outcome != Outcome.ANALYSED:
            reason = result.reason or f"outcome: {result.outcome}"
            return [self._not_run(run, headers, reason)]
        seg, regions = [], []
        if result.label_map is not None:
            # A segmentation model's SEG holds what its SR measures: its
            # volumetric groups reference it (not subject to `segmentation`,
            # which is about saliency objects).
            regions = self._optional(run, "regions", wanted, lambda: self._regions(run, headers))
        elif cfg.segmentation:
            seg = self._optional(run, "seg", wanted, lambda: self._seg(run, headers))
        sr = build_ai_result_sr(
            result,
            headers,
            series_description=cfg.series_description,
            segmentation=seg[0].dataset if seg else None,
            regions=regions[0].dataset if regions else None,
            **self._common(run),
        )
        # The SR last: it lists the SEG as evidence, so that should be there first.
        return [*seg, *regions, BuiltObject("sr", sr)]

    def _build_extras(self, run: PendingRun, headers: list[Dataset]) -> list[BuiltObject]:
        """The objects beside the SR (second pass); each one optional (`_optional`)."""
        wanted = self._wanted()
        summary = self._optional(run, "summary", wanted, lambda: self._summary(run, headers))
        if run.result.outcome != Outcome.ANALYSED:
            return summary
        extras: list[BuiltObject] = []
        if self.config.report.segmentation:
            # A segmentation's own SEG is binary already: no thresholded saliency beside it.
            kinds = (("pmap", self._pmap),) if run.result.label_map is not None else (
                ("binary-seg", self._region_seg), ("pmap", self._pmap))
            for kind, builder in kinds:
                extras += self._optional(run, kind, wanted, partial(builder, run, headers))
        extras += self._optional(run, "gsps", wanted, lambda: self._gsps(run, headers))
        return [*extras, *summary]

    def _optional(
        self, run: PendingRun, kind: str, wanted: set[str], build: Callable[[], Dataset | None]
    ) -> list[BuiltObject]:
        """The object of `kind` if a destination wants it and it can be built.

        The SR carries the findings: an extra object that does not fit its
        images (an empty map, a projection image a parametric map cannot
        describe, headers highdicom will not take) must not hold it back.
        """
        if kind not in wanted:
            return []
        try:
            dataset = build()
        except Exception as exc:
            log.warning("run %d: no %s: %s", run.run_id, kind.upper(), safe_error(exc))
            log.debug("run %d traceback", run.run_id, exc_info=exc)
            return []
        return [] if dataset is None else [BuiltObject(kind, dataset)]

    def _top_present(self, run: PendingRun) -> Finding | None:
        """The most probable present finding, if the run has saliency for it.

        Like the SR, which draws no region for an absent finding, we do not
        show a heat map that invites a look for something the model says is
        not there. The map of a multi-label model mixes labels slice by slice
        (model/inference.py); the top finding is what it mostly shows.
        """
        result = run.result
        present = [f for f in result.findings if f.present]
        if result.saliency is None or result.algorithm is None or not present:
            return None
        return max(present, key=lambda f: f.probability)

    def _object_uids(self, run: PendingRun, kind: str) -> dict[str, Any]:
        return {
            "series_instance_uid": self._uid(run, f"{kind}-series"),
            "sop_instance_uid": self._uid(run, kind),
        }

    def _regions(self, run: PendingRun, headers: list[Dataset]) -> Dataset | None:
        """A segmentation model's regions as a BINARY SEG, a segment per measured finding."""
        cfg = self.config.report
        result = run.result
        if result.label_map is None or result.algorithm is None:
            return None
        return build_segmentation_seg(
            result.label_map, headers, result.algorithm, result.findings,
            series_number=cfg.regions_seg_series_number,
            series_description=cfg.regions_seg_series_description,
            manufacturer=cfg.manufacturer,
            manufacturer_model_name=cfg.manufacturer_model_name,
            **self._object_uids(run, "regions"),
        )  # fmt: skip

    def _seg(self, run: PendingRun, headers: list[Dataset]) -> Dataset | None:
        """The saliency map as a FRACTIONAL SEG for the run's top present finding."""
        cfg = self.config.report
        return self._saliency_object(
            run, headers, "seg", build_saliency_seg,
            cfg.seg_series_number, cfg.seg_series_description,
        )  # fmt: skip

    def _region_seg(self, run: PendingRun, headers: list[Dataset]) -> Dataset | None:
        """The thresholded saliency as a BINARY SEG, for viewers that load no other."""
        cfg = self.config.report
        return self._saliency_object(
            run, headers, "binary-seg", build_region_seg,
            cfg.region_seg_series_number, cfg.region_seg_series_description,
        )  # fmt: skip

    def _pmap(self, run: PendingRun, headers: list[Dataset]) -> Dataset | None:
        """The saliency as a float Parametric Map (OHIF overlays it)."""
        cfg = self.config.report
        return self._saliency_object(
            run, headers, "pmap", build_saliency_map,
            cfg.pmap_series_number, cfg.pmap_series_description,
        )  # fmt: skip

    def _saliency_object(
        self,
        run: PendingRun,
        headers: list[Dataset],
        kind: str,
        builder: Callable[..., Dataset],
        series_number: int,
        series_description: str,
    ) -> Dataset | None:
        """One of the saliency objects (dicom_io/seg.py, pmap.py) of the top present finding."""
        top = self._top_present(run)
        if top is None:
            return None
        cfg = self.config.report
        assert run.result.saliency is not None and run.result.algorithm is not None
        return builder(
            run.result.saliency,
            headers,
            run.result.algorithm,
            top,
            series_number=series_number,
            series_description=series_description,
            manufacturer=cfg.manufacturer,
            manufacturer_model_name=cfg.manufacturer_model_name,
            **self._object_uids(run, kind),
        )

    def _gsps(self, run: PendingRun, headers: list[Dataset]) -> Dataset | None:
        """The regions and labels of the present findings as a GSPS on their key images."""
        result = run.result
        if result.algorithm is None or not any(f.present and f.location for f in result.findings):
            return None
        cfg = self.config.report
        return build_presentation_state(
            result.findings,
            headers,
            result.algorithm,
            series_number=cfg.gsps_series_number,
            series_description=cfg.gsps_series_description,
            manufacturer=cfg.manufacturer,
            manufacturer_model_name=cfg.manufacturer_model_name,
            institution_name=cfg.institution_name,
            institutional_department_name=cfg.institutional_department_name,
            **self._object_uids(run, "gsps"),
        )

    def _summary(self, run: PendingRun, headers: list[Dataset]) -> Dataset:
        """The result as a picture: key slice with region and legend, or a card."""
        result = run.result
        cfg = self.config.report
        reference = headers[0]
        if result.outcome != Outcome.ANALYSED:
            picture = render_not_run(result.reason or str(result.outcome), result.algorithm)
        else:
            assert result.algorithm is not None
            located = [f for f in result.findings if f.present and f.location is not None]
            if located:
                key = max(located, key=lambda f: f.probability).location
                assert key is not None
                reference, pixels = self._key_pixels(run, headers, key)
                picture = render_positive(pixels, reference, result.findings, result.algorithm)
            else:
                picture = render_negative(result.findings, result.algorithm)
        return build_summary_image(
            picture,
            reference,
            algorithm=result.algorithm,
            series_number=cfg.summary_series_number,
            series_description=cfg.summary_series_description,
            manufacturer=cfg.manufacturer,
            **self._object_uids(run, "summary"),
        )

    def _key_pixels(
        self, run: PendingRun, headers: list[Dataset], location: ImageLocation
    ) -> tuple[Dataset, np.ndarray]:
        """The key image's header and its pixels in modality units (HU for CT)."""
        index = next(
            i for i, h in enumerate(headers) if h.SOPInstanceUID == location.sop_instance_uid
        )
        return headers[index], read_modality_pixels(
            self.spool_dir / run.source_paths[index], location.frame_number
        )

    def _headers(self, run: PendingRun, *, light: bool = False) -> list[Dataset]:
        """The source headers, repaired (dicom_io/headers.py): real images lack Type 2
        attributes, even Modality, and carry malformed values.

        `light`: only the first image, the first of each series and the images a
        finding points at are read; the others are what the SR's library and
        evidence need of them (UIDs, series attributes), from the database.
        """
        if not run.source_paths:
            raise ReportError("no images of the study are recorded")
        full = set(range(len(run.source_paths)))
        if light and len(run.source_instances) == len(run.source_paths):
            keys = {
                f.location.sop_instance_uid for f in run.result.findings if f.location is not None
            }
            firsts: dict[str, int] = {}
            for i, src in enumerate(run.source_instances):
                firsts.setdefault(src.series_instance_uid, i)
            full = {0, *firsts.values()} | {
                i for i, src in enumerate(run.source_instances) if src.sop_instance_uid in keys
            }
        read: dict[int, Dataset] = {}
        for index in sorted(full):
            relative = run.source_paths[index]
            path = self.spool_dir / relative
            try:
                read[index] = read_header(path)
            except FileNotFoundError as exc:
                raise ReportError(f"image missing from the spool: {relative}") from exc
            except Exception as exc:
                raise ReportError(f"image unreadable in the spool: {relative}") from exc
        raw = [
            read[i] if i in read else self._light_header(run, i, read)
            for i in range(len(run.source_paths))
        ]
        # An image without Modality takes its series' (the first that has one).
        modality = next((str(h.Modality) for h in raw if h.get("Modality") != "OT"), None)
        if modality is not None:
            for h in raw:
                if h.Modality == UNKNOWN_MODALITY and modality != UNKNOWN_MODALITY:
                    h.Modality = modality
        return raw

    @staticmethod
    def _light_header(run: PendingRun, index: int, read: dict[int, Dataset]) -> Dataset:
        """An image's identity for the SR's library and evidence, without reading its file.

        Series attributes come from its series' first image, read in full;
        what identifies the instance comes from its row.
        """
        src = run.source_instances[index]
        first = next(
            read[i]
            for i in sorted(read)
            if run.source_instances[i].series_instance_uid == src.series_instance_uid
        )
        ds = Dataset()
        ds.StudyInstanceUID = run.result.study_instance_uid
        ds.SeriesInstanceUID = src.series_instance_uid
        ds.SOPClassUID = src.sop_class_uid
        ds.SOPInstanceUID = src.sop_instance_uid
        ds.Modality = first.Modality
        if "FrameOfReferenceUID" in first:
            ds.FrameOfReferenceUID = first.FrameOfReferenceUID
        if "Rows" in first and src.sop_class_uid == first.SOPClassUID:
            ds.Rows, ds.Columns = first.Rows, first.Columns  # an image, as its series
        return ds

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
