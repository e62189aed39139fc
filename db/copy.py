"""`secondreader db copy`: every row from one database to another, ids and signatures kept.

For a move from the embedded SQLite to PostgreSQL. The target is migrated
to the same schema first and must be empty; rows go table by table in
foreign-key order, in one transaction, with their primary keys, so results
keep their numbers (the PACS already holds SRs that name them) and the
audit trail's signatures and chain still verify with the same key. On
PostgreSQL the id sequences then continue after the copied rows.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Integer, create_engine, func, insert, select, text

from db import migrate
from db.models import Base

BATCH = 1000


class CopyError(Exception):
    """The copy cannot start; nothing was written."""


def copy_database(
    source_url: str, target_url: str, progress: Callable[[str, int], None] = lambda _t, _n: None
) -> dict[str, int]:
    """Copy every table's rows; returns the row count per table."""
    source_rev = migrate.current(source_url)
    if source_rev is None:
        raise CopyError("the source has no schema: is --from the right database?")
    if source_rev != migrate.head():
        raise CopyError("the source is at an older schema: run `secondreader db upgrade` on it "
                        "first (with its config)")  # fmt: skip
    migrate.upgrade(target_url)
    src, dst = create_engine(source_url), create_engine(target_url)
    counts: dict[str, int] = {}
    try:
        with src.connect() as read, dst.begin() as write:
            tables = Base.metadata.sorted_tables
            busy = [t.name for t in tables
                    if write.execute(select(func.count()).select_from(t)).scalar()]  # fmt: skip
            if busy:
                raise CopyError(f"the target already holds rows ({', '.join(busy)}): "
                                "copy into a new, empty database")  # fmt: skip
            for table in tables:
                n, batch = 0, []
                for row in read.execute(select(table)).mappings():
                    batch.append(dict(row))
                    if len(batch) >= BATCH:
                        write.execute(insert(table), batch)
                        n, batch = n + len(batch), []
                if batch:
                    write.execute(insert(table), batch)
                    n += len(batch)
                counts[table.name] = n
                progress(table.name, n)
            if dst.dialect.name == "postgresql":
                for table in tables:
                    pk = list(table.primary_key.columns)
                    if len(pk) == 1 and isinstance(pk[0].type, Integer) and counts[table.name]:
                        # The next id after the copied ones (ids were given explicitly).
                        write.execute(text(
                            f"SELECT setval(pg_get_serial_sequence('{table.name}', "
                            f"'{pk[0].name}'), (SELECT MAX({pk[0].name}) FROM {table.name}))"))
    finally:
        src.dispose()
        dst.dispose()
    return counts
