"""`db upgrade` and `db copy`."""

from __future__ import annotations

import argparse

from daemon.cli.parsing import Subparsers
from daemon.config import Config


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


def add_db(sub: Subparsers) -> None:
    p = sub.add_parser("db", help="database maintenance")
    dbsub = p.add_subparsers(dest="db_command", required=True)
    dbsub.add_parser("upgrade", help="apply migrations").set_defaults(func=_cmd_db_upgrade)
    q = dbsub.add_parser("copy", help="copy every row to a new, empty database (e.g. SQLite to "
                                      "PostgreSQL); ids and the audit trail are kept")  # fmt: skip
    q.add_argument("--from", dest="source", required=True, help="source URL (sqlite:///PATH)")
    q.add_argument("--to", dest="target", required=True,
                   help="target URL, e.g. postgresql://USER:PASSWORD@HOST/NAME")  # fmt: skip
    q.set_defaults(func=_cmd_db_copy)
