"""`find`, `pull`, `echo` and `send`: DICOM to and from a remote AE."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.cli.parsing import Subparsers
from daemon.config import Config

if TYPE_CHECKING:
    from dicom_io.scu import RemoteAE


def _remote(config: Config, args: argparse.Namespace) -> RemoteAE:
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


def add_find(sub: Subparsers) -> None:
    p = sub.add_parser("find", help="C-FIND studies on a PACS (study root)")
    _add_remote_args(p)
    p.add_argument("--date", help="StudyDate, e.g. 20261125 or 20261101-20261125")
    p.add_argument("--modality", help="ModalitiesInStudy, e.g. CT")
    p.add_argument("--accession", help="AccessionNumber")
    p.set_defaults(func=_cmd_find)


def add_pull(sub: Subparsers) -> None:
    p = sub.add_parser("pull", help="C-MOVE studies from a PACS to us (or --move-to AE)")
    _add_remote_args(p)
    p.add_argument("study_uids", nargs="+", metavar="STUDY_UID")
    p.add_argument("--move-to", help="destination AE title (default: scp.ae_title)")
    p.set_defaults(func=_cmd_pull)


def add_echo(sub: Subparsers) -> None:
    p = sub.add_parser("echo", help="C-ECHO a remote AE")
    _add_remote_args(p)
    p.set_defaults(func=_cmd_echo)


def add_send(sub: Subparsers) -> None:
    p = sub.add_parser("send", help="C-STORE files or folders to a remote AE")
    _add_remote_args(p)
    p.add_argument("paths", nargs="+", type=Path)
    p.set_defaults(func=_cmd_send)
