"""`serve`, `worker` and `web`: the processes that run in the foreground."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from daemon.cli.parsing import Subparsers
from daemon.config import Config


def _cmd_serve(config: Config, _args: argparse.Namespace) -> int:
    if config.worker.in_process and config.worker.keep_memory_mb:
        _tuned_allocator()
    from daemon.service import Service

    return _exit_now(Service(config).run())


def _cmd_worker(config: Config, _args: argparse.Namespace) -> int:
    if config.worker.keep_memory_mb:
        _tuned_allocator()
    from daemon.stages.analyse.worker import run_worker

    return _exit_now(run_worker(config))


def _exit_now(rc: int) -> int:
    """End the process once its orderly stop is done: nothing is left to write.

    Python's own exit runs the C++ static destructors of the native libraries
    a worker loaded (ITK's and torch's thread pools). After threads of ours
    called into them, one CI run saw such a destructor abort a clean stop
    ("terminate called without an active exception", exit -6) after the
    worker had logged "stopped": the exit code must say how the stop went,
    not how a library tears down. So logs and standard streams are flushed
    and the process leaves without those destructors.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing reaches it
            stream.flush()
    os._exit(rc)


def _tuned_allocator() -> None:
    """Re-run once with the allocator settings a worker needs (daemon/memory.py)."""
    from daemon.memory import exec_with_tunables

    exec_with_tunables()


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


def add_serve(sub: Subparsers) -> None:
    p = sub.add_parser("serve", help="run the daemon in the foreground")
    p.set_defaults(func=_cmd_serve)


def add_worker(sub: Subparsers) -> None:
    p = sub.add_parser("worker", help="run an analysis worker (the infer stage) in the foreground")
    p.set_defaults(func=_cmd_worker)


def add_web(sub: Subparsers) -> None:
    p = sub.add_parser("web", help="the review web page alone, in the foreground")
    p.set_defaults(func=_cmd_web)
