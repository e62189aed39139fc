"""Accounts and web sessions in the database (daemon/accounts.py is the service over them)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from db.models import User, WebSession


@dataclass(frozen=True)
class UserView:
    id: int
    username: str
    full_name: str
    role: str
    disabled: bool
    locked_until: datetime | None


def _view(user: User) -> UserView:
    return UserView(
        user.id, user.username, user.full_name, user.role, user.disabled, user.locked_until
    )


def get_user(session: Session, username: str) -> User | None:
    return session.scalars(select(User).where(User.username == username)).one_or_none()


def list_users(session: Session) -> list[UserView]:
    return [_view(u) for u in session.scalars(select(User).order_by(User.username))]


def add_user(
    session: Session, username: str, full_name: str, password_hash: str, role: str, now: datetime
) -> UserView:
    user = User(
        username=username, full_name=full_name, password_hash=password_hash, role=role,
        disabled=False,
        failed_logins=0, created_at=now, password_changed_at=now,
    )  # fmt: skip
    session.add(user)
    session.flush()
    return _view(user)


def failed_login(session: Session, user: User, *, limit: int, lock_until: datetime) -> bool:
    """Count a wrong password; True when this one locks the account."""
    user.failed_logins += 1
    if user.failed_logins >= limit:
        user.failed_logins = 0
        user.locked_until = lock_until
        return True
    return False


def open_session(
    session: Session, user_id: int, token_hash: str, csrf_token: str, now: datetime
) -> None:
    session.add(
        WebSession(
            token_hash=token_hash, user_id=user_id, csrf_token=csrf_token,
            created_at=now, last_seen_at=now,
        )
    )  # fmt: skip


def find_session(
    session: Session, token_hash: str, *, idle_since: datetime, now: datetime
) -> tuple[UserView, str] | None:
    """The session's user and CSRF token, if it was used since `idle_since`; touches it."""
    row = session.execute(
        select(WebSession, User)
        .join(User, User.id == WebSession.user_id)
        .where(WebSession.token_hash == token_hash)
    ).one_or_none()
    if row is None:
        return None
    web_session, user = row
    if web_session.last_seen_at < idle_since or user.disabled:
        session.delete(web_session)
        return None
    web_session.last_seen_at = now
    return _view(user), web_session.csrf_token


def close_session(session: Session, token_hash: str) -> None:
    session.execute(delete(WebSession).where(WebSession.token_hash == token_hash))


def close_user_sessions(session: Session, user_id: int) -> None:
    session.execute(delete(WebSession).where(WebSession.user_id == user_id))


def set_password(session: Session, user: User, password_hash: str, now: datetime) -> None:
    user.password_hash = password_hash
    user.password_changed_at = now
    user.failed_logins = 0
    user.locked_until = None


def set_disabled(session: Session, user_id: int, disabled: bool) -> None:
    session.execute(update(User).where(User.id == user_id).values(disabled=disabled))
