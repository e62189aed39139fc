"""`secondreader`: the command line of administrators, radiologists' tooling and tests."""

from __future__ import annotations

import argparse
import logging
import os
import select
import sys
from collections.abc import Sequence

from daemon.cli import audit, database, models, network, operations, process, review, users
from daemon.cli.parsing import EXIT_CONFIG, Subparsers, common_options
from daemon.config import ConfigError, load_config
from daemon.logs import setup_logging

log = logging.getLogger("secondreader")

__all__ = ["EXIT_CONFIG", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    # --config and --debug go before or after the command: every parser knows them
    # (SUPPRESS: a subcommand's parser leaves the main one's value alone).
    parser = argparse.ArgumentParser(prog="secondreader", description=__doc__,
                                     parents=[common_options(None, False)])  # fmt: skip
    sub = Subparsers(parser.add_subparsers(dest="command", required=True))

    process.add_serve(sub)
    process.add_worker(sub)
    database.add_db(sub)
    audit.add_audit(sub)
    users.add_user(sub)
    process.add_web(sub)
    operations.add_cleanup(sub)
    operations.add_status(sub)
    operations.add_deliveries(sub)
    review.add_review(sub)
    operations.add_reports(sub)
    models.add_model(sub)
    models.add_demo(sub)
    network.add_find(sub)
    network.add_pull(sub)
    network.add_echo(sub)
    network.add_send(sub)
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

