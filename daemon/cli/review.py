"""`review ...`: physicians' decisions from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from daemon.cli.parsing import Subparsers
from daemon.config import Config
from dicom_io.wording import percent, threshold_percent

if TYPE_CHECKING:  # imported where the command runs: the CLI starts fast
    from daemon.stages.review import Correction, ReviewService
    from db.reviews import FindingView, ResultView


def _review_service(config: Config) -> ReviewService:
    from daemon.factories import open_database
    from daemon.stages.review import ReviewService

    return ReviewService(open_database(config), config)


def _review_call(config: Config, call: Callable[[ReviewService], int | None]) -> int:
    from daemon.stages.review import ReviewError

    service = _review_service(config)
    try:
        return int(call(service) or 0)
    except ReviewError as exc:
        print(f"review: {exc}", file=sys.stderr)
        return 1
    finally:
        service.db.dispose()


def _finding_line(f: FindingView) -> str:
    where = ""
    if f.sop_instance_uid:
        point = f.point or {}
        col, row = point.get("col", 0), point.get("row", 0)
        where = f" at ({col:.0f}, {row:.0f}) on {f.sop_instance_uid}"
    state = "present" if f.present else "absent"
    return (
        f"  {f.number}. {f.finding} ({f.site}): {state}, probability "
        f"{percent(f.probability, f.threshold)} (threshold {threshold_percent(f.threshold)}){where}"
    )


def _cmd_review_list(config: Config, args: argparse.Namespace) -> int:
    def run(service: ReviewService) -> int:
        results = service.results(
            state=None if args.state == "all" else args.state,
            modality=args.modality,
            model=args.model,
            since=args.since,
        )
        if args.json:
            print(json.dumps([_result_json(r) for r in results], indent=2, default=str))
            return 0
        for r in results:
            top = max(r.findings, key=lambda f: f.probability, default=None)
            what = f"{top.finding} {percent(top.probability, top.threshold)}" if top else "-"
            print(
                f"{r.run_id:>6} {r.state:<10} {r.modality or '?':<3} {r.model_name} "
                f"{r.model_version}  {what}  {r.created_at:%Y-%m-%d %H:%M}  "
                f"study {r.study_instance_uid}"
            )
        if not results:
            print("no results")
        return 0

    return _review_call(config, run)


def _result_json(r: ResultView) -> dict[str, Any]:
    return {
        "run_id": r.run_id,
        "state": r.state,
        "study_instance_uid": r.study_instance_uid,
        "modality": r.modality,
        "model": f"{r.model_name} {r.model_version}",
        "created_at": r.created_at.isoformat(),
        "ai_sr": r.ai_sr_sop_instance_uid,
        "findings": [vars(f) for f in r.findings],
        "decisions": [vars(d) for d in r.decisions],
        "verifications": [vars(v) for v in r.verifications],
    }


def _cmd_review_show(config: Config, args: argparse.Namespace) -> int:
    def run(service: ReviewService) -> int:
        r, events = service.show(args.result)
        if args.json:
            print(json.dumps({**_result_json(r), "history": events}, indent=2, default=str))
            return 0
        print(f"result {r.run_id}: {r.state}; model {r.model_name} {r.model_version}")
        print(f"study {r.study_instance_uid}, series {r.series_instance_uid}")
        print(f"AI SR {r.ai_sr_sop_instance_uid}")
        print("findings:")
        for f in r.findings:
            print(_finding_line(f))
            for d in (d for d in r.decisions if d.finding_id == f.finding_id):
                extra = f": {d.comment}" if d.comment else ""
                print(f"       round {d.round}: {d.decision} by {d.reviewer}{extra}")
        for v in r.verifications:
            why = f" ({v.reason})" if v.reason else ""
            print(f"verified SR {v.sr_sop_instance_uid}, round {v.round}, by {v.reviewer}{why}")
        print("history:")
        stored = [e for e in events if e["event"] == "instance.stored"]
        if stored:
            print(f"  {stored[0]['at']:%Y-%m-%d %H:%M:%S} {len(stored)} instance(s) received, "
                  f"the last at {stored[-1]['at']:%H:%M:%S}")  # fmt: skip
        for e in events:
            if e["event"] != "instance.stored":
                print(f"  {e['at']:%Y-%m-%d %H:%M:%S} {e['event']:<28} {e['actor']}")
        return 0

    return _review_call(config, run)


def _correction(args: argparse.Namespace) -> Correction | None:
    from daemon.stages.review import Correction

    if not args.slice:
        return None
    return Correction(
        args.slice,
        point=tuple(args.point) if args.point else None,
        box=tuple(args.box) if args.box else None,
        frame_number=args.frame,
    )


def _report_verified(uid: str | None) -> None:
    if uid:
        print(f"verified SR {uid} queued for the PACS")
    else:
        print("decision recorded; findings remain undecided")


def _cmd_review_decide(config: Config, args: argparse.Namespace) -> int:
    def run(service: ReviewService) -> int:
        uid = service.decide(
            args.result,
            args.decision,
            service.account_reviewer(args.reviewer),
            finding=args.finding,
            comment=args.comment,
            correction=_correction(args) if args.decision == "correct" else None,
        )
        _report_verified(uid)
        return 0

    return _review_call(config, run)


def _cmd_review_amend(config: Config, args: argparse.Namespace) -> int:
    def run(service: ReviewService) -> int:
        uid = service.amend(
            args.result,
            args.finding,
            args.decision,
            service.account_reviewer(args.reviewer),
            reason=args.reason,
            comment=args.comment,
            correction=_correction(args),
        )
        _report_verified(uid)
        return 0

    return _review_call(config, run)


def _cmd_review_stats(config: Config, args: argparse.Namespace) -> int:
    def run(service: ReviewService) -> int:
        rows = service.stats(args.model)
        if args.json:
            print(json.dumps([a.as_dict() for a in rows], indent=2))
            return 0

        def pct(v: float | None) -> str:
            return "-" if v is None else f"{v:.0%}"

        # AI present: confirmed, corrected, rejected (PPV from these); AI absent: confirmed,
        # rejected; agreement: all confirmed over all decided.
        head = ("P+conf", "P+corr", "P+rej", "PPV", "A-conf", "A-rej", "agree")
        print(f"{'model':<40} {'period':<9} " + " ".join(f"{h:>6}" for h in head))
        for a in rows:
            print(
                f"{a.model:<40} {a.period:<9} {a.present_confirmed:>6} {a.present_corrected:>6} "
                f"{a.present_rejected:>6} {pct(a.ppv):>6} {a.absent_confirmed:>6} "
                f"{a.absent_rejected + a.absent_corrected:>6} {pct(a.agreement):>6}"
            )
        if not rows:
            print("no review decisions yet")
        return 0

    return _review_call(config, run)


def add_review(sub: Subparsers) -> None:
    p = sub.add_parser("review", help="physician review: confirm, reject or correct AI findings")
    rv = p.add_subparsers(dest="review_command", required=True)
    q = rv.add_parser("list", help="results to review (pending by default), triage order")
    q.add_argument(
        "--state", choices=["pending", "in_review", "verified", "amended", "decided", "all"],
        default="pending",
    )  # fmt: skip
    q.add_argument("--modality")
    q.add_argument("--model", help="model name")
    q.add_argument("--since", type=datetime.fromisoformat, help="analysed since (UTC)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_cmd_review_list)
    q = rv.add_parser("show", help="a result's findings, decisions and history")
    q.add_argument("result", type=int, help="result id (review list)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_cmd_review_show)

    def location_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--slice", help="SOP Instance UID of the image the finding is on")
        q.add_argument("--point", type=float, nargs=2, metavar=("X", "Y"), help="column row")
        q.add_argument(
            "--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), help="columns, rows"
        )
        q.add_argument("--frame", type=int, help="frame number (multi-frame images)")

    for decision, text in (
        ("confirm", "confirm the finding(s)"),
        ("reject", "reject: the finding is absent"),
        ("correct", "the finding is there, at another location"),
    ):
        q = rv.add_parser(decision, help=text)
        q.add_argument("result", type=int)
        q.add_argument(
            "--finding", type=int, required=decision == "correct",
            help="finding number (default: every undecided finding)",
        )  # fmt: skip
        q.add_argument(
            "--reviewer", required=True,
            help="your user name (an enabled account; its full name signs the SR)",
        )  # fmt: skip
        q.add_argument("--comment")
        if decision == "correct":
            location_args(q)
        q.set_defaults(func=_cmd_review_decide, decision=decision)
    q = rv.add_parser("amend", help="decide a verified finding again (a new verified SR)")
    q.add_argument("result", type=int)
    q.add_argument("--finding", type=int, required=True)
    q.add_argument("--decision", choices=["confirm", "reject", "correct"], required=True)
    q.add_argument("--reason", required=True)
    q.add_argument("--reviewer", required=True, help="your user name (an enabled account)")
    q.add_argument("--comment")
    location_args(q)
    q.set_defaults(func=_cmd_review_amend)
    q = rv.add_parser("stats", help="agreement with the AI per model version, by week")
    q.add_argument("--model", help="model name")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_cmd_review_stats)
