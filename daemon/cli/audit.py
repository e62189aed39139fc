"""`audit verify` and `audit export`: the tamper-evident trail."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime

from daemon.cli.parsing import Subparsers
from daemon.config import Config


def _cmd_audit_verify(config: Config, args: argparse.Namespace) -> int:
    from daemon.factories import open_database
    from daemon.stages.seal import seal_audit_trail, verify_audit_trail

    db = open_database(config)
    if args.seal:
        seal_audit_trail(db)
    report = verify_audit_trail(db)
    db.dispose()
    print(
        f"audit trail: {report.sealed} sealed row(s), head seq {report.head_seq} "
        f"mac {report.head_mac}"
    )
    if report.unsealed:
        print(
            f"{report.unsealed} row(s) not sealed yet (signed; the daemon chains them every "
            f"{config.audit.seal_interval_seconds:g} s)"
        )
    if report.intact:
        print("intact: no row altered, deleted or inserted")
        return 0
    print(f"BROKEN: {len(report.problems)} problem(s); the first:")
    for i, problem in enumerate(report.problems):
        print(f"  {'*' if i == 0 else '-'} {problem.kind}: {problem.message}")
    return 1


def _cmd_audit_export(config: Config, args: argparse.Namespace) -> int:
    from daemon.factories import open_database
    from daemon.stages.seal import export_audit_trail

    db = open_database(config, signed=False)
    text = export_audit_trail(db, study_instance_uid=args.study, since=args.since, fmt=args.format)
    db.dispose()
    rows = [line for line in text.splitlines()[(1 if args.format == "csv" else 0):] if line]
    if args.study and not rows:
        print(f"secondreader: no audit events for study {args.study}"
              + (f" since {args.since}" if args.since else ""), file=sys.stderr)  # fmt: skip
        return 1
    sys.stdout.write(text)
    return 0


def add_audit(sub: Subparsers) -> None:
    p = sub.add_parser("audit", help="the tamper-evident audit trail")
    asub = p.add_subparsers(dest="audit_command", required=True)
    q = asub.add_parser("verify", help="check the chain; names the first altered row (exit 1)")
    q.add_argument("--seal", action="store_true", help="chain the unsealed rows first")
    q.set_defaults(func=_cmd_audit_verify)
    q = asub.add_parser("export", help="the trail, or one study's story, in time order")
    q.add_argument("--study", help="Study Instance UID")
    q.add_argument("--since", type=datetime.fromisoformat, help="UTC, ISO 8601")
    q.add_argument("--format", choices=["jsonl", "csv"], default="jsonl",
                   help="jsonl, one JSON object per line (the default), or csv")  # fmt: skip
    q.set_defaults(func=_cmd_audit_export)
