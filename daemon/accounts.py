"""Local accounts of the web page: argon2 passwords, lockout, server-side sessions.

A session is a random token in an HttpOnly cookie; the database keeps only
its SHA-256, the user, a CSRF token for the forms, and when it was last
used (`web.session_idle_minutes`). `web.lockout_attempts` wrong passwords in
a row lock the account for `web.lockout_minutes`. Every login, failure,
lock, logout and account change is audited under the username; a password
never is, nor anything of a patient.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from daemon.config import WebConfig
from db import accounts, audit
from db.accounts import UserView
from db.audit import EventType
from db.models import utcnow
from db.session import Database

ROLES = ("reviewer", "admin")
# Verified against when the user does not exist: the same time either way.
_DUMMY_HASH = PasswordHasher().hash("no such user")


log = logging.getLogger(__name__)


class AccountError(ValueError):
    pass


@dataclass(frozen=True)
class LoggedIn:
    user: UserView
    csrf_token: str


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AccountService:
    def __init__(self, db: Database, config: WebConfig) -> None:
        self.db = db
        self.config = config
        self.hasher = PasswordHasher()

    # -- administration (CLI) --------------------------------------------------
    def add(
        self, username: str, password: str, role: str, actor: str, full_name: str | None = None
    ) -> UserView:
        """A new account; `full_name` as DICOM writes a person ("Smith^Jane"), in their SRs."""
        _check_name(username)
        _check_password(password)
        if role not in ROLES:
            raise AccountError(f"role must be one of {', '.join(ROLES)}")
        name = (full_name or username).strip()
        if not 1 <= len(name) <= 64 or any(c in name for c in "\\\n\r"):
            raise AccountError("a full name is 1-64 characters, e.g. Smith^Jane")
        with self.db.session() as s:
            if accounts.get_user(s, username) is not None:
                raise AccountError(f"user {username!r} exists already")
            user = accounts.add_user(s, username, name, self.hasher.hash(password), role, utcnow())
            audit.record(s, EventType.USER_CREATED, actor, user=username, role=role)
        return user

    def set_password(self, username: str, password: str, actor: str) -> None:
        _check_password(password)
        with self.db.session() as s:
            user = self._user(s, username)
            accounts.set_password(s, user, self.hasher.hash(password), utcnow())
            accounts.close_user_sessions(s, user.id)
            audit.record(s, EventType.USER_PASSWORD_CHANGED, actor, user=username)

    def disable(self, username: str, actor: str) -> None:
        with self.db.session() as s:
            user = self._user(s, username)
            accounts.set_disabled(s, user.id, True)
            accounts.close_user_sessions(s, user.id)
            audit.record(s, EventType.USER_DISABLED, actor, user=username)

    def enable(self, username: str, actor: str) -> None:
        with self.db.session() as s:
            user = self._user(s, username)
            accounts.set_disabled(s, user.id, False)
            audit.record(s, EventType.USER_ENABLED, actor, user=username)

    def unlock(self, username: str, actor: str) -> None:
        """End a lockout now (`passwd` does too: a new password unlocks)."""
        with self.db.session() as s:
            user = self._user(s, username)
            user.locked_until, user.failed_logins = None, 0
            audit.record(s, EventType.USER_UNLOCKED, actor, user=username)

    def locked_until(self, username: str) -> datetime | None:
        """When the account's lockout ends, if it is locked now (what the login page says)."""
        with self.db.session() as s:
            user = accounts.get_user(s, username)
            if user is None or user.locked_until is None or user.locked_until <= utcnow():
                return None
            return user.locked_until

    def users(self) -> list[UserView]:
        with self.db.session() as s:
            return accounts.list_users(s)

    @staticmethod
    def _user(s, username: str):
        user = accounts.get_user(s, username)
        if user is None:
            raise AccountError(f"no user {username!r}")
        return user

    # -- logging in ------------------------------------------------------------
    def login(self, username: str, password: str, address: str) -> str | None:
        """A new session token, or None (wrong password, unknown, disabled or locked)."""
        now = utcnow()
        with self.db.session() as s:
            user = accounts.get_user(s, username)
            if user is None:
                _verify(self.hasher, _DUMMY_HASH, password)
                audit.record(s, EventType.LOGIN_FAILED, "web", address=address, reason="unknown")
                return None
            if user.disabled or (user.locked_until is not None and user.locked_until > now):
                reason = "disabled" if user.disabled else "locked"
                audit.record(s, EventType.LOGIN_FAILED, username, address=address, reason=reason)
                return None
            if not _verify(self.hasher, user.password_hash, password):
                locked = accounts.failed_login(
                    s, user, limit=self.config.lockout_attempts,
                    lock_until=now + timedelta(minutes=self.config.lockout_minutes),
                )  # fmt: skip
                audit.record(
                    s, EventType.LOGIN_LOCKED if locked else EventType.LOGIN_FAILED, username,
                    address=address, reason="wrong password",
                )  # fmt: skip
                if locked:
                    log.warning(
                        "account %s locked for %g min after %d wrong passwords "
                        "(`secondreader user unlock %s` ends it)", username,
                        self.config.lockout_minutes, self.config.lockout_attempts, username,
                    )  # fmt: skip
                return None
            user.failed_logins = 0
            return self._open(s, user.id, username, address, now)

    def login_trusted(self, username: str, address: str) -> str | None:
        """A session for a user a trusted reverse proxy named (single sign-on)."""
        now = utcnow()
        with self.db.session() as s:
            user = accounts.get_user(s, username)
            if user is None or user.disabled:
                audit.record(s, EventType.LOGIN_FAILED, "web", address=address, reason="proxy")
                return None
            return self._open(s, user.id, username, address, now)

    def _open(self, s, user_id: int, username: str, address: str, now) -> str:
        token = secrets.token_urlsafe(32)
        accounts.open_session(s, user_id, _token_hash(token), secrets.token_urlsafe(32), now)
        audit.record(s, EventType.LOGIN_SUCCEEDED, username, address=address)
        return token

    def session(self, token: str) -> LoggedIn | None:
        now = utcnow()
        idle = now - timedelta(minutes=self.config.session_idle_minutes)
        with self.db.session() as s:
            found = accounts.find_session(s, _token_hash(token), idle_since=idle, now=now)
        return None if found is None else LoggedIn(*found)

    def logout(self, token: str, username: str, address: str) -> None:
        with self.db.session() as s:
            accounts.close_session(s, _token_hash(token))
            audit.record(s, EventType.LOGOUT, username, address=address)


def _verify(hasher: PasswordHasher, stored: str, password: str) -> bool:
    try:
        return hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def _check_name(username: str) -> None:
    if (
        not (1 <= len(username) <= 64)
        or not username.replace("^", "")
        .replace(".", "")
        .replace("-", "")
        .replace("_", "")
        .isalnum()
    ):
        raise AccountError("a username is 1-64 letters, digits and . _ - ^")


def _check_password(password: str) -> None:
    if len(password) < 12:
        raise AccountError("a password has at least 12 characters")
