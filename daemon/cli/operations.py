"""`status`, `cleanup`, `deliveries ...` and `reports retry`: running the daemon."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from daemon.cli.parsing import Subparsers
from daemon.config import Config


def _cmd_status(config: Config, args: argparse.Namespace) -> int:
    from datetime import timedelta

    from daemon.factories import open_database
    from daemon.liveness import gone_after, worker_alert
    from daemon.stages.retain import Cleaner
    from db.liveness import processes
    from db.models import utcnow
    from db.pulls import pull_counts
    from db.retention import files_removed_count
    from db.studies import pipeline_counts

    db = open_database(config, signed=False)
    now, limit = utcnow(), gone_after(config)
    with db.session() as s:
        report: dict[str, Any] = {**pipeline_counts(s), "pull": pull_counts(s)}
        removed = files_removed_count(s)
        running = processes(s, now - timedelta(days=1))
    storage = Cleaner(db, config).storage_state()
    alert = worker_alert(db, config)
    db.dispose()
    report["dead_letters"] = report["outbox"].get("dead", 0)
    report["storage"] = {**storage, "studies_files_removed": removed}
    report["processes"] = [
        {"name": p.name, "kind": p.kind, "alive": p.alive(now, limit),
         "last_beat": p.beat_at.isoformat(), "stopped": p.stopped_at is not None}
        for p in running
    ]  # fmt: skip
    report["warnings"] = [alert] if alert else []
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    print("processes (the last day's):")
    for p in running:
        ago = int((now - p.beat_at).total_seconds())
        state = ("stopped" if p.stopped_at is not None
                 else "running" if p.alive(now, limit) else "NOT ANSWERING")  # fmt: skip
        print(f"  {p.kind:<9}{state:<15}last beat {ago} s ago  {p.name}")
    if not running:
        print("  none: `secondreader serve` is not running")
    if alert:
        print(f"WARNING: {alert}")
    print("studies:")
    for state in ("receiving", "complete"):
        print(f"  {state:<16}{report['studies'].get(state, 0)}")
    print("jobs:")
    for state in ("queued", "running", "done", "failed", "not_applicable"):
        print(f"  {state:<16}{report['jobs'].get(state, 0)}")
    print(f"queue depth: {report['jobs'].get('queued', 0)}")
    print("reports:")
    for state in ("pending", "reported", "failed"):
        print(f"  {state:<16}{report['reports'].get(state, 0)}")
    print("outbox:")
    for state in ("pending", "done", "dead"):
        print(f"  {state:<16}{report['outbox'].get(state, 0)}")
    dead = report["dead_letters"]
    print(
        f"dead letters: {dead}"
        + (" (see `secondreader deliveries list --state dead`)" if dead else "")
    )
    if report["pull"]:
        print("scheduled pull:")
        for state in ("pulled", "present", "retry", "failed"):
            print(f"  {state:<16}{report['pull'].get(state, 0)}")
    st = report["storage"]
    print(
        f"disk: {st['used_percent']:.1f} % used (high watermark {st['high_watermark_percent']:g} %)"
        f"; files removed by retention: {st['studies_files_removed']} study(ies)"
    )
    if st["blocked"]:
        print(
            "DISK NEARLY FULL and no finished study left to remove: studies still in the "
            "pipeline (receiving, queued, unreported, undelivered, awaiting review) hold it"
        )
    return 0


def _cmd_cleanup(config: Config, args: argparse.Namespace) -> int:
    from daemon.factories import open_database
    from daemon.stages.retain import Cleaner

    db = open_database(config, signed=not args.dry_run)
    report = Cleaner(db, config).run_once(dry_run=args.dry_run)
    db.dispose()
    verb = "would remove" if args.dry_run else "removed"
    if args.json:
        print(json.dumps({
            "dry_run": args.dry_run,
            "in_window": report.in_window,
            "blocked": report.blocked,
            "disk_used_percent_before": round(report.disk_before.percent, 2),
            "disk_used_percent_after": round(report.disk_after.percent, 2),
            "studies": [vars(r) for r in report.removed],
        }, indent=2))  # fmt: skip
    else:
        for r in report.removed:
            print(f"{verb} {r.files} file(s), {r.size_bytes / 1e6:.1f} MB of study "
                  f"{r.study_instance_uid} ({r.reason})")  # fmt: skip
        if not report.in_window:
            print("outside the retention window: no removal by age now")
        print(f"disk: {report.disk_before.percent:.1f} % used before, "
              f"{report.disk_after.percent:.1f} % after; {len(report.removed)} study(ies) "
              f"{verb}")  # fmt: skip
        if report.blocked:
            print("DISK NEARLY FULL and no finished study left to remove", file=sys.stderr)
    return 2 if report.blocked else 0


def _cmd_deliveries_list(config: Config, args: argparse.Namespace) -> int:
    from daemon.factories import open_database
    from db.outbox import list_items

    db = open_database(config, signed=False)
    with db.session() as s:
        items = list_items(s, state=args.state, limit=args.limit)
    db.dispose()
    if args.json:
        rows = [
            {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in vars(item).items()}
            for item in items
        ]
        print(json.dumps(rows, indent=2))
        return 0
    for item in items:
        status = "" if item.last_status is None else f" status=0x{item.last_status:04X}"
        print(
            f"{item.id:>6} {item.state:<8} {item.object_kind:<4} {item.destination:<12}"
            f" attempts={item.attempts}{status} sop={item.sop_instance_uid}"
        )
        if item.last_error:
            print(f"         last error: {item.last_error}")
    if not items:
        print("no outbox items")
    return 0


def _cmd_deliveries_retry(config: Config, args: argparse.Namespace) -> int:
    from daemon.factories import open_database
    from db.outbox import requeue_dead

    db = open_database(config)
    with db.session() as s:
        n = requeue_dead(s, ids=args.ids, destination=args.destination, actor="cli")
    db.dispose()
    # The running daemon picks them up at its next delivery tick.
    print(f"re-queued {n} dead letter(s)")
    return 0


def _cmd_reports_retry(config: Config, args: argparse.Namespace) -> int:
    from daemon.factories import open_database
    from db.reports import requeue_failed_reports

    db = open_database(config)
    with db.session() as s:
        ids = requeue_failed_reports(s, run_ids=args.ids, actor="cli")
    db.dispose()
    # The running daemon builds them again at its next report tick.
    print(f"re-queued {len(ids)} failed report(s)" + (f": runs {ids}" if ids else ""))
    return 0


def add_cleanup(sub: Subparsers) -> None:
    p = sub.add_parser(
        "cleanup", help="retention: remove the files of finished studies (by age, by disk)"
    )
    p.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_cleanup)


def add_status(sub: Subparsers) -> None:
    p = sub.add_parser("status", help="studies by state and queue depth")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)


def add_deliveries(sub: Subparsers) -> None:
    p = sub.add_parser("deliveries", help="the outbox: SR/SEG deliveries to the PACS")
    dsub = p.add_subparsers(dest="deliveries_command", required=True)
    q = dsub.add_parser("list", help="outbox items, newest first")
    q.add_argument("--state", choices=["pending", "done", "dead"])
    q.add_argument("--limit", type=int, default=50)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_cmd_deliveries_list)
    q = dsub.add_parser("retry", help="re-queue dead letters (all, or those selected)")
    q.add_argument("--id", dest="ids", type=int, action="append", default=[], help="item id")
    q.add_argument("--destination", help="only this destination's dead letters")
    q.set_defaults(func=_cmd_deliveries_retry)


def add_reports(sub: Subparsers) -> None:
    p = sub.add_parser("reports", help="the report stage: AI result and not-run SRs")
    rsub = p.add_subparsers(dest="reports_command", required=True)
    q = rsub.add_parser("retry", help="build failed reports again (all, or the runs selected)")
    q.add_argument("--run", dest="ids", type=int, action="append", default=[], help="run id")
    q.set_defaults(func=_cmd_reports_retry)
