"""Stage 7, review: physicians confirm, reject or correct each AI finding.

The service layer of the review. The CLI (`secondreader review ...`) and the
web page call it and hold no review logic of their own.

* Every analysed result with findings waits for review. Each finding gets a
  decision: confirm, reject (stated absent) or correct (kept, at the
  physician's location), with an optional comment and the reviewer's name
  and organisation.
* When every finding of a result is decided, a verified SR is built
  (VERIFIED, FINAL, Verifying Observer, the AI SR as predecessor) and queued
  for every destination; objects held for review (release = after_review)
  are released or withheld.
* A decided result is never decided again silently: `amend` is a new round,
  with a reason, whose verified SR supersedes the previous one.
* A decision signed on the web page is held for `review.undo_seconds`
  (`hold=True`): until then `undo` withdraws it and nothing reaches the
  PACS; after it, `finalize_pending` (scheduled in `serve`) builds the SR.
* Only an existing, enabled account signs: `account_reviewer` turns a
  user name into the name the verified SR carries.

Decisions are committed first, the verified SR is built outside any
transaction, then its rows go in one transaction. A crash in between
leaves a complete round without its SR: `finalize_pending` (scheduled in
`serve`) builds it; its UIDs are derived from the run and the round, so a
second attempt makes the same object, and the unique (run, round) of the
verification keeps it single.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from daemon.config import Config
from db import accounts, reviews
from db.errors import WrittenMeanwhile
from db.layout import OUTBOX_DIR
from db.models import Decision, ModelMode, utcnow
from db.outbox import NewOutboxItem, queue_items
from db.reviews import Agreement, FindingView, ResultView
from db.session import Database
from dicom_io.spool import Spool
from dicom_io.sr import ReviewDecision, build_verified_sr
from model.results import ImageLocation

log = logging.getLogger(__name__)



class ReviewError(Exception):
    """What the reviewer asked for cannot be done; the message says why."""


def triage_key(r: ResultView) -> tuple[bool, float, Any, int]:
    """A present finding first, then the most probable, then the oldest.

    A reader clears the cases the AI flags before the ones it calls clear,
    the most confident flag first; among equals, the longest waiting.
    """
    return (not any(f.present for f in r.findings), -r.top_probability, r.created_at, r.run_id)


@dataclass(frozen=True)
class Reviewer:
    name: str  # as DICOM PN wants it, e.g. "Smith^Jane"
    organization: str


@dataclass(frozen=True)
class Correction:
    """Where the physician says the finding is: one image, a point or a box."""

    sop_instance_uid: str
    point: tuple[float, float] | None = None  # (column, row)
    box: tuple[float, float, float, float] | None = None  # (col0, row0, col1, row1)
    frame_number: int | None = None

    def __post_init__(self) -> None:
        if (self.point is None) == (self.box is None):
            raise ReviewError("a correction needs either a point or a box")


class ReviewService:
    def __init__(self, db: Database, config: Config) -> None:
        self.db = db
        self.config = config
        # The report stage's folder: verified SRs go next to the AI SR.
        self.outbox = Spool(config.storage.layout.outbox, fsync=config.storage.fsync)

    def reviewer(self, name: str) -> Reviewer:
        if not name.strip():
            raise ReviewError("say who reviews: --reviewer NAME")
        return Reviewer(name.strip(), self.config.review.organization)

    def account_reviewer(self, username: str) -> Reviewer:
        """The reviewer behind an account: only an existing, enabled one signs."""
        with self.db.session() as s:
            user = accounts.get_user(s, username.strip())
            if user is None:
                raise ReviewError(
                    f"no account {username!r}: --reviewer is a user name "
                    "(`secondreader user list`; `user add` creates one)"
                )
            if user.disabled:
                raise ReviewError(f"account {username!r} is disabled: it cannot sign")
            name = user.full_name
        return self.reviewer(name)

    # -- reading -------------------------------------------------------------
    def results(self, **filters: Any) -> list[ResultView]:
        """Results in triage order (`triage_key`), as the CLI and the web page list them."""
        with self.db.session() as s:
            results = reviews.list_results(s, **filters)
        return sorted(results, key=triage_key)

    def show(self, run_id: int) -> tuple[ResultView, list[dict[str, Any]]]:
        with self.db.session() as s:
            result = self._result(s, run_id)
            events = [
                {"at": e.at, "event": e.event_type, "actor": e.actor, "detail": e.detail}
                for e in reviews.history(s, result)
            ]
        return result, events

    def stats(self, model: str | None = None) -> list[Agreement]:
        with self.db.session() as s:
            return reviews.agreement_stats(s, model=model)

    # -- deciding ------------------------------------------------------------
    def decide(
        self,
        run_id: int,
        decision: str,
        reviewer: Reviewer,
        *,
        finding: int | None = None,
        comment: str | None = None,
        correction: Correction | None = None,
        hold: bool = False,
    ) -> str | None:
        """Decide one finding (or every undecided one); the verified SR's UID once complete.

        With `hold` the SR waits for the undo window (`finalize_pending` builds it).
        """
        if decision not in tuple(Decision):
            raise ReviewError(f"unknown decision {decision!r}")
        if decision == Decision.CORRECT and (finding is None or correction is None):
            raise ReviewError("a correction names its finding and the new location")
        try:
            targets = self._record_decisions(
                run_id, decision, reviewer, finding, comment, correction
            )
        except WrittenMeanwhile as exc:  # the unique (finding, round): another reader was first
            raise ReviewError(
                f"a finding of result {run_id} was decided meanwhile by another reader: "
                "open the result again"
            ) from exc
        log.info(
            "result %d: %s finding(s) %s by %s",
            run_id,
            decision,
            ", ".join(str(f.number) for f in targets),
            reviewer.name,
        )
        if hold and self.config.review.undo_seconds > 0:
            return None
        return self.finalize(run_id)

    def _record_decisions(
        self,
        run_id: int,
        decision: str,
        reviewer: Reviewer,
        finding: int | None,
        comment: str | None,
        correction: Correction | None,
    ) -> list[FindingView]:
        with self.db.session() as s:
            reviews.lock_run(s, run_id)
            result = self._result(s, run_id)
            if result.verifications:
                raise ReviewError(
                    f"result {run_id} is decided already, verified by "
                    f"{result.verifications[-1].reviewer} (verified SR "
                    f"{result.verifications[-1].sr_sop_instance_uid}): an amendment, with a "
                    "reason, is the way to change it"
                )
            decided = {d.finding_id for d in result.decisions if d.round == result.round}
            targets = self._targets(result, finding, decided)
            for f in targets:
                reviews.record_decision(
                    s,
                    result,
                    f,
                    round=result.round,
                    decision=decision,
                    reviewer=reviewer.name,
                    organization=reviewer.organization,
                    comment=comment,
                    location=self._location(result, f, correction) if correction else None,
                )
        return targets

    def undo(self, run_id: int, reviewer: Reviewer, now: datetime | None = None) -> list[int]:
        """Withdraw `reviewer`'s decisions still inside the undo window; the finding numbers.

        Refused once the round's verified SR is built: then it is an amendment.
        """
        since = (now or utcnow()) - timedelta(seconds=self.config.review.undo_seconds)
        with self.db.session() as s:
            reviews.lock_run(s, run_id)
            result = self._result(s, run_id)
            mine = [d for d in result.decisions if d.round == result.round]
            if not mine and result.verifications:
                raise ReviewError(
                    f"too late to undo: the verified SR of result {run_id} is built and queued "
                    "for the PACS; amend it instead, with a reason"
                )
            numbers = reviews.withdraw_decisions(s, result, reviewer=reviewer.name, since=since)
        if not numbers:
            raise ReviewError(
                f"nothing of yours to undo on result {run_id}: the undo window "
                f"({self.config.review.undo_seconds:g} s) is over or the decision is another's"
            )
        log.info("result %d: decision(s) on finding(s) %s undone", run_id, numbers)
        return numbers

    def amend(
        self,
        run_id: int,
        finding: int,
        decision: str,
        reviewer: Reviewer,
        *,
        reason: str,
        comment: str | None = None,
        correction: Correction | None = None,
    ) -> str | None:
        """Decide a verified result's finding again: a new round and a superseding SR."""
        if not reason.strip():
            raise ReviewError("an amendment says why: --reason TEXT")
        if decision not in tuple(Decision):
            raise ReviewError(f"unknown decision {decision!r}")
        if decision == Decision.CORRECT and correction is None:
            raise ReviewError("a correction names the new location")
        try:
            with self.db.session() as s:
                reviews.lock_run(s, run_id)
                result = self._result(s, run_id)
                if not result.verifications:
                    raise ReviewError(
                        f"result {run_id} has not been decided yet: confirm, reject or correct it"
                    )
                previous = result.verifications[-1].round
                last = {d.finding_id: d for d in result.decisions if d.round == previous}
                target = self._finding(result, finding)
                for f in result.findings:
                    old = last[f.finding_id]
                    if f.finding_id == target.finding_id:
                        values: dict[str, Any] = {
                            "decision": decision,
                            "comment": comment,
                            "location": (
                                self._location(result, f, correction) if correction else None
                            ),
                            "reviewer": reviewer.name,
                            "organization": reviewer.organization,
                        }
                    else:  # carried over: the new round states every finding
                        values = {
                            "decision": old.decision,
                            "comment": old.comment,
                            "location": old.location,
                            "reviewer": old.reviewer,
                            "organization": old.organization,
                        }
                    reviews.record_decision(
                        s,
                        result,
                        f,
                        round=previous + 1,
                        amendment=f.finding_id == target.finding_id,
                        **values,
                    )
        except WrittenMeanwhile as exc:  # another amendment of the same round was first
            raise ReviewError(
                f"result {run_id} was amended meanwhile by another reader: open it again"
            ) from exc
        log.info("result %d: finding %d amended by %s", run_id, finding, reviewer.name)
        return self.finalize(run_id, reason=reason.strip(), by=reviewer)

    # -- the verified SR -----------------------------------------------------
    def finalize(
        self, run_id: int, *, reason: str | None = None, by: Reviewer | None = None
    ) -> str | None:
        """Build and queue the verified SR of the run's complete round, if it has one."""
        with self.db.session() as s:
            result = self._result(s, run_id)
            round_ = result.round
            decisions = {d.finding_id: d for d in result.decisions if d.round == round_}
        if len(decisions) < len(result.findings):
            return None  # findings still undecided
        # The report stage's layout: <outbox>/<study>/<SOP Instance UID>.dcm, sent or not.
        folder = self.outbox.root / result.study_instance_uid
        try:
            ai_sr = dcmread(folder / f"{result.ai_sr_sop_instance_uid}.dcm")
            supersedes = (
                dcmread(folder / f"{result.verifications[-1].sr_sop_instance_uid}.dcm")
                if result.verifications
                else None
            )
        except FileNotFoundError as exc:
            raise ReviewError(f"an SR of result {run_id} is missing from the outbox") from exc
        last = max(decisions.values(), key=lambda d: d.decided_at)
        by = by or Reviewer(last.reviewer, last.organization)
        sr = self._build(result, round_, ai_sr, supersedes, decisions, by)
        relative = f"{result.study_instance_uid}/{sr.SOPInstanceUID}.dcm"
        buf = io.BytesIO()
        sr.save_as(buf, enforce_file_format=True)
        predecessor = str((supersedes or ai_sr).SOPInstanceUID)
        signed = {f: d.decided_at for f, d in decisions.items()}
        try:
            with self.db.session() as s:
                reviews.lock_run(s, run_id)
                current = self._result(s, run_id)
                still = {d.finding_id: d.decided_at for d in current.decisions
                         if d.round == round_}  # fmt: skip
                if still != signed or current.round != round_:
                    return None  # undone (or decided anew) while the SR was built
                # Written under the run's lock, once the round is known to stand: a
                # stale pass never overwrites the file of the SR another one queued.
                self.outbox.write(relative, buf.getvalue())
                reviews.record_verification(
                    s,
                    result,
                    round=round_,
                    reviewer=by.name,
                    organization=by.organization,
                    reason=reason,
                    sr_sop_instance_uid=str(sr.SOPInstanceUID),
                    predecessor=predecessor,
                )
                # A review-only model version's results reach no PACS, verified or not.
                destinations = [] if result.mode == ModelMode.REVIEW_ONLY else (
                    self.config.delivery.destinations
                )
                queue_items(
                    s,
                    [
                        NewOutboxItem(
                            study_id=result.study_id,
                            run_id=result.run_id,
                            object_kind="verified-sr",
                            sop_class_uid=str(sr.SOPClassUID),
                            sop_instance_uid=str(sr.SOPInstanceUID),
                            path=f"{OUTBOX_DIR}/{relative}",
                            destination=d.name,
                        )
                        for d in destinations
                    ],
                )
                reviews.release_held(
                    s,
                    result,
                    send={
                        d.name: d.send_ai_result_after_review
                        for d in self.config.delivery.destinations
                    },
                    actor=by.name,
                )
        except WrittenMeanwhile:
            # Another pass (serve's finalize_pending) finalized this round first:
            # the UIDs are derived from the run and round, so its SR is this one.
            return str(sr.SOPInstanceUID)
        log.info(
            "result %d: verified SR %s (round %d) queued for %d destination(s)",
            run_id,
            sr.SOPInstanceUID,
            round_,
            len(self.config.delivery.destinations),
        )
        return str(sr.SOPInstanceUID)

    def finalize_pending(self, now: datetime | None = None) -> int:
        """Complete rounds past their undo window, or whose verified SR a crash left
        unbuilt (scheduled in serve)."""
        done = 0
        for result, due in self._complete_rounds():
            if due > (now or utcnow()):
                continue
            try:
                done += self.finalize(result.run_id) is not None
            except Exception as exc:
                # One result that cannot be finalized (its AI SR gone from the outbox, a
                # write error) must not hold back every other signed result.
                log.error("result %d: verified SR not built: %s", result.run_id, exc)
        return done

    def next_release(self) -> datetime | None:
        """When the next held round's undo window ends (naive UTC), or None."""
        return min((due for _, due in self._complete_rounds()), default=None)

    def _complete_rounds(self) -> list[tuple[ResultView, datetime]]:
        window = timedelta(seconds=self.config.review.undo_seconds)
        rounds = []
        for result in self.results(state="in_review"):
            mine = [d for d in result.decisions if d.round == result.round]
            if len(mine) == len(result.findings):
                rounds.append((result, max(d.decided_at for d in mine) + window))
        return rounds

    def _build(
        self,
        result: ResultView,
        round_: int,
        ai_sr: Dataset,
        supersedes: Dataset | None,
        decisions: dict[int, reviews.DecisionView],
        by: Reviewer,
    ) -> Dataset:
        items = []
        for f in result.findings:
            d = decisions[f.finding_id]
            if f.tracking_uid is None:
                raise ReviewError(f"finding {f.number} has no tracking UID (not reported?)")
            note = f"{d.reviewer} ({d.organization})"
            comment = f"{note}: {d.comment}" if d.comment else note
            items.append(
                ReviewDecision(
                    f.tracking_uid,
                    d.decision != Decision.REJECT,
                    comment,
                    _image_location(d.location) if d.decision == Decision.CORRECT else None,
                )
            )
        cfg, report = self.config.review, self.config.report
        return build_verified_sr(
            ai_sr,
            items,
            verifying_observer_name=by.name,
            verifying_organization=by.organization,
            series_number=cfg.series_number,
            series_description=cfg.series_description,
            series_instance_uid=_uid(result, "verified-series", 0),
            sop_instance_uid=_uid(result, "verified", round_),
            instance_number=round_,
            manufacturer=report.manufacturer,
            manufacturer_model_name=report.manufacturer_model_name,
            institution_name=report.institution_name,
            institutional_department_name=report.institutional_department_name,
            supersedes=supersedes,
        )

    # -- helpers ---------------------------------------------------------------
    @staticmethod
    def _result(session: Any, run_id: int) -> ResultView:
        result = reviews.load_result(session, run_id)
        if result is None:
            raise ReviewError(
                f"no AI result {run_id} to review (it must be analysed and its AI SR built)"
            )
        if not result.findings:
            raise ReviewError(f"result {run_id} has no findings to review")
        return result

    @staticmethod
    def _finding(result: ResultView, number: int) -> FindingView:
        for f in result.findings:
            if f.number == number:
                return f
        raise ReviewError(
            f"result {result.run_id} has findings 1 to {len(result.findings)}, not {number}"
        )

    def _targets(
        self, result: ResultView, number: int | None, decided: set[int]
    ) -> list[FindingView]:
        if number is None:
            targets = [f for f in result.findings if f.finding_id not in decided]
            if not targets:
                raise ReviewError(f"every finding of result {result.run_id} is decided already")
            return targets
        f = self._finding(result, number)
        if f.finding_id in decided:
            d = next(d for d in result.decisions
                     if d.finding_id == f.finding_id and d.round == result.round)  # fmt: skip
            raise ReviewError(
                f"finding {number} of result {result.run_id} is decided already: "
                f"{d.decision} by {d.reviewer} at {d.decided_at:%Y-%m-%d %H:%M} UTC"
            )
        return [f]

    @staticmethod
    def _location(result: ResultView, f: FindingView, c: Correction) -> dict[str, Any]:
        # The corrected location must be on one of the images the AI SR lists:
        # the verified SR can reference nothing else (highdicom checks it too).
        sop_class = f.sop_class_uid
        if sop_class is None:
            sop_class = next((g.sop_class_uid for g in result.findings if g.sop_class_uid), None)
        location: dict[str, Any] = {
            "sop_instance_uid": c.sop_instance_uid,
            "sop_class_uid": sop_class,
            "frame_number": c.frame_number,
        }
        if c.point is not None:
            location["point"] = {"col": c.point[0], "row": c.point[1]}
        if c.box is not None:
            c0, r0, c1, r1 = c.box
            location["box"] = {"col0": c0, "row0": r0, "col1": c1, "row1": r1}
            location["point"] = {"col": (c0 + c1) / 2, "row": (r0 + r1) / 2}
        return location


def _image_location(location: dict[str, Any] | None) -> ImageLocation:
    if location is None:
        raise ReviewError("a correction without its location")
    box = location.get("box")
    point = location["point"]
    return ImageLocation(
        sop_instance_uid=location["sop_instance_uid"],
        sop_class_uid=location.get("sop_class_uid") or "",
        point=(float(point["col"]), float(point["row"])),
        box=(box["col0"], box["row0"], box["col1"], box["row1"]) if box else None,
        frame_number=location.get("frame_number"),
    )


def _uid(result: ResultView, kind: str, round_: int) -> str:
    # Derived, not random: a second attempt after a crash builds the same object.
    return str(
        generate_uid(
            entropy_srcs=[
                "secondreader-review",
                result.study_instance_uid,
                str(result.run_id),
                kind,
                str(round_),
            ]
        )
    )
