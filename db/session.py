"""Engine and session factory for SQLite (default) and PostgreSQL."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Executable, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker


def _sqlite_pragmas(synchronous: str) -> Any:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        # WAL: readers never block the receive path's writers.
        cur.execute("PRAGMA journal_mode=WAL")
        # Concurrent associations write from several threads: wait, don't fail.
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return on_connect


class _WriteLock:
    """One writer at a time across our processes on one SQLite file: a file lock.

    SQLite's own wait for its write lock sleeps between tries (its busy
    handler: 1, 2, 5, 10 ms and longer), so with four associations storing
    at once in two receiving processes, the receive path spent much of its
    time asleep while the lock was free. A blocked flock() wakes as soon as
    the lock is released. flock belongs to the open file, so threads of one
    process take a thread lock first.
    """

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0

    def _file(self) -> int | None:
        if self._path is None:
            return None
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
        return self._fd

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._thread_lock:
            fd = self._file()
            if fd is None:
                yield
                return
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


class Database:
    """Owns the engine; hands out short transactional sessions."""

    def __init__(
        self,
        url: str,
        *,
        sqlite_synchronous: str = "NORMAL",
        echo: bool = False,
        audit_key: bytes | None = None,
    ) -> None:
        """`audit_key` signs every audit row written through this database (db/chain.py)."""
        self.url = url
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["pool_size"] = 10
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas(sqlite_synchronous))
        self.audit_key = audit_key
        database = self.engine.url.database if self.is_sqlite else None
        self._write_lock = _WriteLock(
            f"{database}-writelock" if database and database != ":memory:" else None
        )
        self._factory = sessionmaker(
            self.engine, expire_on_commit=False, info={"audit_key": audit_key}
        )

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on error."""
        with self._factory() as session, session.begin():
            yield session

    @contextmanager
    def write_session(self) -> Iterator[Session]:
        """`session` for a short write on a hot path (the receive stage).

        On SQLite the writers of all our processes queue on one file lock
        (`_WriteLock`); PostgreSQL locks rows, and this is `session`.
        """
        if not self.is_sqlite:
            with self.session() as session:
                yield session
            return
        with self._write_lock.hold(), self.session() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def changed_rows(session: Session, statement: Executable) -> int:
    """Execute an UPDATE or DELETE; the number of rows it changed."""
    return cast("CursorResult[Any]", session.execute(statement)).rowcount
