"""`secondreader`: the command line of administrators, radiologists' tooling and tests."""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.config import Config, ConfigError, load_config
from daemon.logs import setup_logging

log = logging.getLogger("secondreader")

EXIT_CONFIG = 2


def _cmd_serve(config: Config, _args: argparse.Namespace) -> int:
    from daemon.service import Service

    return Service(config).run()


def _cmd_worker(config: Config, _args: argparse.Namespace) -> int:
    from daemon.stages.analyse.worker import run_worker

    return run_worker(config)


def _cmd_db_upgrade(config: Config, _args: argparse.Namespace) -> int:
    from daemon.errors import UserError
    from daemon.factories import open_database
    from db import chain, installation, migrate

    config.storage.state_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(config.database_url)
    print(f"database at revision {migrate.current(config.database_url)}")
    key_path = config.audit_key_path
    if not key_path.exists():
        # A database whose rows are signed needs its own key back: a new one
        # would make every row fail `audit verify` (a false tamper alarm).
        db = open_database(config, signed=False)
        with db.session() as s:
            rows, recorded = installation.signed_rows(s), installation.recorded_fingerprint(s)
        db.dispose()
        if rows or recorded:
            raise UserError(
                f"the audit key {key_path} is missing, and this database holds {rows} audit "
                f"row(s) signed with its key (fingerprint {recorded or 'not recorded'}): copy "
                "audit.key from the host or folder where `secondreader db upgrade` first ran "
                "to that path, or point audit.key_file at it; no new key was made"
            )
        chain.create_key(key_path)
        print(f"created the audit key {key_path} (mode 0600): keep it outside the database")
    key = chain.load_key(key_path)
    db = open_database(config)  # a key other than the database's recorded one stops here
    with db.session() as s:
        if installation.recorded_fingerprint(s) is None:
            if not chain.key_signed(s, key):
                raise UserError(
                    f"the audit key {key_path} did not sign this database's audit rows: copy "
                    "the key they were signed with, or point audit.key_file at it"
                )
            installation.record_fingerprint(s, key)
            print(f"recorded the audit key's fingerprint {installation.fingerprint(key)}: "
                  "every process checks its key against it")  # fmt: skip
        signed = chain.sign_unsigned(s, key)
    db.dispose()
    if signed:
        print(f"signed {signed} audit row(s) written before the trail was signed")
    return 0


def _cmd_db_copy(config: Config, args: argparse.Namespace) -> int:
    from daemon.config import normalise_database_url
    from daemon.errors import UserError
    from db.copy import CopyError, copy_database

    source, target = normalise_database_url(args.source), normalise_database_url(args.target)
    try:
        counts = copy_database(source, target,
                               lambda table, n: print(f"  {table:<28}{n:>9} row(s)"))  # fmt: skip
    except CopyError as exc:
        raise UserError(str(exc)) from None
    print(f"copied {sum(counts.values())} row(s) in {len(counts)} table(s)")
    print("next: set database.url to the target for every process, keep the same audit key "
          "(audit.key_file) and state folder, and run `secondreader audit verify` there")
    return 0


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


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        from daemon.errors import UserError

        raise UserError("no terminal to ask for the password: give it on standard input "
                        "with --password-stdin")  # fmt: skip
    import getpass

    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise SystemExit("secondreader: the two passwords differ")
    return first


def _cmd_user(config: Config, args: argparse.Namespace) -> int:
    import getpass

    from daemon.accounts import AccountError, AccountService
    from daemon.factories import open_database
    from db.models import utcnow

    db = open_database(config)
    service = AccountService(db, config.web)
    actor = f"cli:{getpass.getuser()}"
    try:
        if args.user_command == "add":
            service.add(args.name, _password(args), args.role, actor, args.full_name)
            print(f"user {args.name} ({args.role}) added")
        elif args.user_command == "passwd":
            service.set_password(args.name, _password(args), actor)
            print(f"password of {args.name} changed; their sessions are closed")
        elif args.user_command == "disable":
            service.disable(args.name, actor)
            print(f"user {args.name} disabled; their sessions are closed")
        elif args.user_command == "enable":
            service.enable(args.name, actor)
            print(f"user {args.name} enabled")
        elif args.user_command == "unlock":
            service.unlock(args.name, actor)
            print(f"user {args.name} unlocked: the wrong-password count starts again")
        else:
            now = utcnow()
            print(f"{'USER':<24} {'FULL NAME':<28} {'ROLE':<9} STATE")
            for u in service.users():
                state = "disabled" if u.disabled else (
                    f"locked until {u.locked_until:%Y-%m-%d %H:%M} UTC"
                    if u.locked_until is not None and u.locked_until > now else "active")
                print(f"{u.username:<24} {u.full_name:<28} {u.role:<9} {state}")
    except AccountError as exc:
        print(f"secondreader: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    return 0


def _cmd_web(config: Config, _args: argparse.Namespace) -> int:
    """The web page alone, in the foreground (serve runs it too with web.enabled)."""
    from waitress import serve

    from daemon.errors import check_port_free
    from daemon.factories import open_database
    from daemon.liveness import worker_alert
    from daemon.web import create_app

    db = open_database(config)
    check_port_free("web page", "web.port", config.web.host, config.web.port)

    def healthy() -> bool:
        try:
            with db.session() as s:
                s.connection()
        except Exception:
            return False
        return worker_alert(db, config) is None

    serve(create_app(config, db, healthy), host=config.web.host, port=config.web.port, threads=4)
    return 0


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


def _review_service(config: Config):  # type: ignore[no-untyped-def]
    from daemon.factories import open_database
    from daemon.stages.review import ReviewService

    return ReviewService(open_database(config), config)


def _review_call(config: Config, call) -> int:  # type: ignore[no-untyped-def]
    from daemon.stages.review import ReviewError

    service = _review_service(config)
    try:
        return int(call(service) or 0)
    except ReviewError as exc:
        print(f"review: {exc}", file=sys.stderr)
        return 1
    finally:
        service.db.dispose()


def _finding_line(f) -> str:  # type: ignore[no-untyped-def]
    where = ""
    if f.sop_instance_uid:
        point = f.point or {}
        col, row = point.get("col", 0), point.get("row", 0)
        where = f" at ({col:.0f}, {row:.0f}) on {f.sop_instance_uid}"
    state = "present" if f.present else "absent"
    return (
        f"  {f.number}. {f.finding} ({f.site}): {state}, probability {f.probability:.0%} "
        f"(threshold {f.threshold:.0%}){where}"
    )


def _cmd_review_list(config: Config, args: argparse.Namespace) -> int:
    def run(service) -> int:  # type: ignore[no-untyped-def]
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
            what = f"{top.finding} {top.probability:.0%}" if top else "-"
            print(
                f"{r.run_id:>6} {r.state:<10} {r.modality or '?':<3} {r.model_name} "
                f"{r.model_version}  {what}  {r.created_at:%Y-%m-%d %H:%M}  "
                f"study {r.study_instance_uid}"
            )
        if not results:
            print("no results")
        return 0

    return _review_call(config, run)


def _result_json(r) -> dict:  # type: ignore[no-untyped-def,type-arg]
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
    def run(service) -> int:  # type: ignore[no-untyped-def]
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


def _correction(args: argparse.Namespace):  # type: ignore[no-untyped-def]
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
    def run(service) -> int:  # type: ignore[no-untyped-def]
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
    def run(service) -> int:  # type: ignore[no-untyped-def]
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
    def run(service) -> int:  # type: ignore[no-untyped-def]
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


def _remote(config: Config, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from dicom_io.scu import RemoteAE
    from dicom_io.tls import client_context

    ctx = None
    if args.tls:
        ctx = client_context(args.tls_ca, args.tls_cert, args.tls_key)
    return RemoteAE(
        ae_title=args.aet,
        host=args.host,
        port=args.port,
        calling_ae_title=args.calling_aet or config.scp.ae_title,
        ssl_context=ctx,
    )


def _cmd_echo(config: Config, args: argparse.Namespace) -> int:
    from dicom_io.scu import AssociationFailed, echo

    try:
        status = echo(_remote(config, args))
    except AssociationFailed as exc:
        print(f"echo failed: {exc}", file=sys.stderr)
        return 1
    print(f"C-ECHO status 0x{status:04X}")
    return 0 if status == 0 else 1


def _cmd_send(config: Config, args: argparse.Namespace) -> int:
    from dicom_io.scu import AssociationFailed, expand, send

    files = expand(args.paths)
    try:
        results = send(files, _remote(config, args))
    except AssociationFailed as exc:
        print(f"send failed: {exc}", file=sys.stderr)
        return 1
    failed = [r for r in results if not r.ok]
    for r in failed:
        status = "no response" if r.status is None else f"0x{r.status:04X}"
        print(f"failed: {r.path} ({status})", file=sys.stderr)
    print(f"sent {len(results) - len(failed)} of {len(results)} file(s)")
    return 0 if not failed else 1


def _cmd_model_train(_config: Config, args: argparse.Namespace) -> int:
    from model.train import train

    if (args.csv is None) != (args.dicom_root is None):
        print("secondreader: --csv and --dicom-root go together", file=sys.stderr)
        return EXIT_CONFIG
    report = train(
        args.output,
        kind=args.kind,
        seed=args.seed,
        epochs=args.epochs,
        n_train=args.n_train,
        csv=args.csv,
        dicom_root=args.dicom_root,
        device=args.device,
        name=args.name,
        version=args.version,
    )
    print(f"model written to {args.output}")
    for key, value in sorted(report.metrics.items()):
        print(f"  {key:<24}{value:.4f}" if isinstance(value, float) else f"  {key:<24}{value}")
    return 0


def _cmd_model_evaluate(_config: Config, args: argparse.Namespace) -> int:
    from model.registry import builtin_model_dir
    from model.train import evaluate

    folder = args.model or builtin_model_dir()
    metrics = evaluate(
        folder, seed=args.seed, csv=args.csv, dicom_root=args.dicom_root, device=args.device
    )
    print(f"{folder}:")
    for key in (
        "auc",
        "sensitivity",
        "specificity",
        "n",
        "study_auc",
        "study_sensitivity",
        "study_specificity",
        "n_studies",
    ):
        if key in metrics:
            value = metrics[key]
            print(
                f"  {key:<20}{value:.4f}"
                if key not in ("n", "n_studies")
                else f"  {key:<20}{int(value)}"
            )
    return 0


def _cmd_demo(_config: Config, args: argparse.Namespace) -> int:
    from dicom_io.synthetic import write_ct_series
    from model.phantom import phantom_volume

    volume, centre = phantom_volume(
        args.seed, n_slices=args.slices, rows=256, cols=256, lesion=args.lesion
    )
    paths = write_ct_series(
        volume,
        args.output,
        spacing=(2.5, 1.4, 1.4),
        series_description="Synthetic chest CT" + (" (nodule)" if args.lesion else ""),
        seed=args.seed,
    )
    where = f", nodule centred at slice {centre[0] + 1}" if centre else ", no nodule"
    print(f"wrote {len(paths)} CT slices to {args.output}{where}")
    return 0


def _cmd_find(config: Config, args: argparse.Namespace) -> int:
    from dicom_io.query import find_studies
    from dicom_io.scu import AssociationFailed

    try:
        matches = find_studies(
            _remote(config, args),
            study_date=args.date or "",
            modality=args.modality or "",
            accession_number=args.accession or "",
        )
    except AssociationFailed as exc:
        print(f"find failed: {exc}", file=sys.stderr)
        return 1
    for m in matches:
        n = "?" if m.number_of_instances is None else m.number_of_instances
        print(
            f"{m.study_instance_uid}  {m.study_date or '-':<8}  {m.modalities or '-':<8}"
            f"  {m.accession_number or '-':<16}  {n} instance(s)"
        )
    print(f"{len(matches)} stud{'y' if len(matches) == 1 else 'ies'}")
    return 0


def _cmd_pull(config: Config, args: argparse.Namespace) -> int:
    from dicom_io.query import move_study
    from dicom_io.scu import AssociationFailed

    remote = _remote(config, args)
    destination = args.move_to or config.scp.ae_title
    failed = 0
    for uid in args.study_uids:
        try:
            result = move_study(remote, uid, destination)
        except (AssociationFailed, ValueError) as exc:
            print(f"pull {uid} failed: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(
            f"{uid}: status 0x{result.status:04X}, {result.completed} sent to {destination},"
            f" {result.failed} failed, {result.warning} warning(s)"
        )
        failed += 0 if result.ok else 1
    return 0 if not failed else 1


def _add_remote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=104)
    p.add_argument("--aet", default="ANY-SCP", help="called AE title")
    p.add_argument("--calling-aet", help="our AE title (default: scp.ae_title)")
    p.add_argument("--tls", action="store_true", help="use DICOM TLS")
    p.add_argument("--tls-ca", type=Path)
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)


def _common(config: Any, debug: Any) -> argparse.ArgumentParser:
    """--config and --debug, new for each parser (parents share their action objects)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", type=Path, default=config,
                        help="TOML config file (or $SECONDREADER_CONFIG)")  # fmt: skip
    common.add_argument("--debug", action="store_true", default=debug,
                        help="log at DEBUG, and show the traceback of any error")  # fmt: skip
    return common


class _Subparsers:
    """add_subparsers whose every parser, nested ones too, takes --config and --debug.

    Their defaults are SUPPRESS: given after the command they count, and
    otherwise the value before the command (or its default) stays.
    """

    def __init__(self, action: Any) -> None:
        self.action = action

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        common = _common(argparse.SUPPRESS, argparse.SUPPRESS)
        parser = self.action.add_parser(name, parents=[common], **kwargs)
        original = parser.add_subparsers

        def add_subparsers(**kw: Any) -> _Subparsers:
            return _Subparsers(original(**kw))

        parser.add_subparsers = add_subparsers
        return parser


def build_parser() -> argparse.ArgumentParser:
    # --config and --debug go before or after the command: every parser knows them
    # (SUPPRESS: a subcommand's parser leaves the main one's value alone).
    parser = argparse.ArgumentParser(prog="secondreader", description=__doc__,
                                     parents=[_common(None, False)])  # fmt: skip
    sub = _Subparsers(parser.add_subparsers(dest="command", required=True))

    p = sub.add_parser("serve", help="run the daemon in the foreground")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("worker", help="run an analysis worker (the infer stage) in the foreground")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("db", help="database maintenance")
    dbsub = p.add_subparsers(dest="db_command", required=True)
    dbsub.add_parser("upgrade", help="apply migrations").set_defaults(func=_cmd_db_upgrade)
    q = dbsub.add_parser("copy", help="copy every row to a new, empty database (e.g. SQLite to "
                                      "PostgreSQL); ids and the audit trail are kept")  # fmt: skip
    q.add_argument("--from", dest="source", required=True, help="source URL (sqlite:///PATH)")
    q.add_argument("--to", dest="target", required=True,
                   help="target URL, e.g. postgresql://USER:PASSWORD@HOST/NAME")  # fmt: skip
    q.set_defaults(func=_cmd_db_copy)

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

    p = sub.add_parser("user", help="accounts of the web page (reviewer, admin)")
    usub = p.add_subparsers(dest="user_command", required=True)
    for name, text in (("add", "add an account"), ("passwd", "set a new password")):
        q = usub.add_parser(name, help=text)
        q.add_argument("name")
        if name == "add":
            q.add_argument("--role", choices=["reviewer", "admin"], default="reviewer")
            q.add_argument("--full-name", help='as in their verified SRs, e.g. "Smith^Jane"')
        q.add_argument("--password-stdin", action="store_true", help="read it from stdin")
        q.set_defaults(func=_cmd_user)
    for name, text in (
        ("disable", "disable an account (its sessions end)"),
        ("enable", "enable a disabled account again"),
        ("unlock", "end a lockout after wrong passwords (`passwd` unlocks too)"),
    ):
        q = usub.add_parser(name, help=text)
        q.add_argument("name")
        q.set_defaults(func=_cmd_user)
    usub.add_parser(
        "list", help="the accounts: full name, role, disabled or locked"
    ).set_defaults(func=_cmd_user)

    p = sub.add_parser("web", help="the review web page alone, in the foreground")
    p.set_defaults(func=_cmd_web)

    p = sub.add_parser(
        "cleanup", help="retention: remove the files of finished studies (by age, by disk)"
    )
    p.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_cleanup)

    p = sub.add_parser("status", help="studies by state and queue depth")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

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

    p = sub.add_parser("reports", help="the report stage: AI result and not-run SRs")
    rsub = p.add_subparsers(dest="reports_command", required=True)
    q = rsub.add_parser("retry", help="build failed reports again (all, or the runs selected)")
    q.add_argument("--run", dest="ids", type=int, action="append", default=[], help="run id")
    q.set_defaults(func=_cmd_reports_retry)

    p = sub.add_parser("model", help="train and evaluate models")
    msub = p.add_subparsers(dest="model_command", required=True)
    q = msub.add_parser("train", help="train a slice classifier; writes a model folder")
    q.add_argument("output", type=Path, help="model folder to write")
    q.add_argument("--kind", choices=["ct", "cr"], default="ct", help="synthetic data set")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--epochs", type=int, help="maximum epochs (default: per kind)")
    q.add_argument("--n-train", type=int, default=2400, help="synthetic training slices")
    q.add_argument("--csv", type=Path, help="site data: CSV of study_uid,label")
    q.add_argument("--dicom-root", type=Path, help="site data: folder of the CSV's studies")
    q.add_argument("--device", default="auto")
    q.add_argument("--name", help="model name in the manifest")
    q.add_argument("--version", default="1.0.0")
    q.set_defaults(func=_cmd_model_train)
    q = msub.add_parser("evaluate", help="AUC, sensitivity, specificity on the test set")
    q.add_argument("model", type=Path, nargs="?", help="model folder (default: built-in)")
    q.add_argument("--seed", type=int, help="synthetic test set seed (default: the manifest's)")
    q.add_argument("--csv", type=Path)
    q.add_argument("--dicom-root", type=Path)
    q.add_argument("--device", default="auto")
    q.set_defaults(func=_cmd_model_evaluate)

    p = sub.add_parser("demo", help="write a synthetic chest CT study to try the pipeline")
    p.add_argument("output", type=Path, help="folder to write the DICOM files to")
    p.add_argument("--lesion", action=argparse.BooleanOptionalAction, default=True,
                   help="with a lung nodule (default), or --no-lesion without")  # fmt: skip
    p.add_argument("--slices", type=int, default=40, help="number of axial slices (default 40)")
    p.add_argument("--seed", type=int, default=15,
                   help="phantom seed: another seed, another anatomy (default 15)")  # fmt: skip
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("find", help="C-FIND studies on a PACS (study root)")
    _add_remote_args(p)
    p.add_argument("--date", help="StudyDate, e.g. 20261125 or 20261101-20261125")
    p.add_argument("--modality", help="ModalitiesInStudy, e.g. CT")
    p.add_argument("--accession", help="AccessionNumber")
    p.set_defaults(func=_cmd_find)

    p = sub.add_parser("pull", help="C-MOVE studies from a PACS to us (or --move-to AE)")
    _add_remote_args(p)
    p.add_argument("study_uids", nargs="+", metavar="STUDY_UID")
    p.add_argument("--move-to", help="destination AE title (default: scp.ae_title)")
    p.set_defaults(func=_cmd_pull)

    p = sub.add_parser("echo", help="C-ECHO a remote AE")
    _add_remote_args(p)
    p.set_defaults(func=_cmd_echo)

    p = sub.add_parser("send", help="C-STORE files or folders to a remote AE")
    _add_remote_args(p)
    p.add_argument("paths", nargs="+", type=Path)
    p.set_defaults(func=_cmd_send)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"secondreader: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging("DEBUG" if args.debug else config.logging.level, config.logging.json_format)
    try:
        rc = int(args.func(config, args))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return rc
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # a socket's, not ours to hide
        # `secondreader status | head`: the reader has what it wanted. (SIGPIPE stays
        # ignored, as Python sets it: a peer's closed socket must raise, not kill us.)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        message = _one_line(exc)
        if message is None or args.debug:
            raise
        print(f"secondreader: {message}", file=sys.stderr)
        return EXIT_CONFIG


def _stdout_gone() -> bool:
    """True when nobody reads our standard output any more (a closed pipe)."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _fd, ev in poller.poll(0))


def _one_line(exc: Exception) -> str | None:
    """An anticipated error in one line (what is wrong, what to do); None: a real bug."""
    from daemon.errors import UserError
    from db.chain import AuditKeyMissing
    from db.errors import describe
    from db.installation import AuditKeyMismatch

    if isinstance(exc, UserError | AuditKeyMismatch | AuditKeyMissing):
        return str(exc)
    return describe(exc)


if __name__ == "__main__":
    sys.exit(main())
