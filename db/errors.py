"""Database errors in words an administrator can act on (the CLI prints them in one line)."""

from __future__ import annotations

from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
)

# A write a unique constraint refused: another process, or another reader, was
# first. Code outside db/ catches it by this name (only db/ imports SQLAlchemy).
WrittenMeanwhile = IntegrityError


def describe(exc: BaseException) -> str | None:
    """One line for an anticipated database error; None for anything else."""
    if isinstance(exc, NoSuchModuleError | ArgumentError):
        return (f"database.url is not a database URL we can use ({_first_line(exc)}): "
                "write sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/NAME")  # fmt: skip
    reason = _first_line(exc.orig or exc) if isinstance(exc, DBAPIError) else ""
    if isinstance(exc, DBAPIError) and ("no such table" in reason or "does not exist" in reason):
        return (f"the database's schema is incomplete ({reason}): run "
                "`secondreader db upgrade`")  # fmt: skip
    if isinstance(exc, OperationalError):
        # psycopg's and sqlite3's reasons name the host and port, or the file.
        if "connect" in reason.lower() or "unable to open" in reason:
            return (f"cannot reach the database: {reason}; check database.url, that the "
                    "server runs and that it accepts us")  # fmt: skip
        return f"the database failed: {reason}; check that the disk has room and try again"
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return f"the database connection was lost: {_first_line(exc.orig or exc)}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
