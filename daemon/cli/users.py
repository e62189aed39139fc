"""`user ...`: the web page's accounts."""

from __future__ import annotations

import argparse
import sys

from daemon.cli.parsing import Subparsers
from daemon.config import Config


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


def add_user(sub: Subparsers) -> None:
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
