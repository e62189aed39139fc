"""Engine and session factory for SQLite (default) and PostgreSQL."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Executable, create_engine, event, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

_BUSY_TIMEOUT_MS = 30000


def _remaining_ms(deadline: float) -> int:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("no time left for the database write")
    return max(1, int(remaining * 1000))


def _sqlite_pragmas(synchronous: str) -> Any:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        # WAL: readers never block the receive path's writers.
        cur.execute("PRAGMA journal_mode=WAL")
        # Concurrent associations write from several threads: wait, don't fail.
        cur.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
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
    def hold(self, deadline: float | None = None) -> Iterator[None]:
        """The lock; past `deadline` (time.monotonic), `DeadlineExceeded` instead."""
        if deadline is None:
            self._thread_lock.acquire()
        elif not self._thread_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise DeadlineExceeded("the database write lock was not free in time")
        try:
            fd = self._file()
            if fd is None:
                yield
                return
            self._lock_file(fd, deadline)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    @staticmethod
    def _lock_file(fd: int, deadline: float | None) -> None:
        if deadline is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return
        # flock has no timeout: try, then poll, the pause growing to 1 ms.
        pause = 0.0002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() + pause > deadline:
                    raise DeadlineExceeded("the database write lock was not free in time") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.001)  # short: a writer must not keep losing


class DeadlineExceeded(TimeoutError):
    """A write could not start or finish before its deadline (`Database.write_session`)."""


def database_unavailable(exc: BaseException) -> bool:
    """The database failed, not the code: locked, disk full, server gone, deadline passed.

    For callers outside db/ that report such failures as one line and retry,
    keeping tracebacks for real defects.
    """
    return isinstance(exc, (OperationalError, PoolTimeout, DeadlineExceeded))


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
    def write_session(self, deadline: float | None = None) -> Iterator[Session]:
        """`session` for a short write on a hot path (the receive stage).

        On SQLite the writers of all our processes queue on one file lock
        (`_WriteLock`); PostgreSQL locks rows, and this is `session`.
        `deadline` (time.monotonic): the database's waits for its locks end
        there (SQLite's busy timeout, PostgreSQL's lock and statement
        timeouts), and the write fails with `DeadlineExceeded` or the
        driver's own error instead of holding the caller.
        """
        if deadline is None:
            if not self.is_sqlite:
                with self.session() as session:
                    yield session
                return
            with self._write_lock.hold(), self.session() as session:
                yield session
            return
        if not self.is_sqlite:
            with self.session() as session:
                ms = _remaining_ms(deadline)
                session.connection().exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")
                session.connection().exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")
                yield session
            return
        with self._write_lock.hold(deadline), self.session() as session:
            # On the sqlite3 connection itself: through SQLAlchemy, the two
            # statements cost the receive path some 5 % (bench/ingest.py).
            raw: Any = session.connection().connection.driver_connection
            raw.execute(f"PRAGMA busy_timeout={_remaining_ms(deadline)}")
            try:
                yield session
            finally:
                # The connection goes back to the pool: its usual patience with it.
                raw.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")

    def dispose(self) -> None:
        self.engine.dispose()


def changed_rows(session: Session, statement: Executable) -> int:
    """Execute an UPDATE or DELETE; the number of rows it changed."""
    return cast("CursorResult[Any]", session.execute(statement)).rowcount
