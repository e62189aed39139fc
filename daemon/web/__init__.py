"""The review web page: server-rendered (Flask, Jinja2), no front-end build.

Blueprints, in the order a reviewer meets them: the worklist
(daemon/web/worklist.py), a result with its image viewer and the two-step
decision (result.py, viewer.py), and the admin pages (admin.py; a model
version's drift, drift.py). Every
decision goes through the review service (daemon/stages/review.py) under the
logged-in account, as the CLI's do.

Security: every page but the login and /healthz needs a session
(daemon/accounts.py); admin pages need the admin role; every POST carries the
session's CSRF token (the `csrf_field` macro in templates/macros.html); the
session cookie is HttpOnly and SameSite=Strict (Secure with
`web.secure_cookies`). URLs carry run numbers only, never a patient
attribute, and nothing here logs a request line.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from datetime import datetime
from functools import wraps
from pathlib import Path
from typing import Any

from flask import Flask, abort, g, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException

from daemon.accounts import AccountService
from daemon.config import Config
from daemon.stages.review import ReviewService
from daemon.web.site import Site
from db.models import utcnow
from db.session import Database
from dicom_io.wording import percent, threshold_percent

COOKIE = "secondreader_session"
HERE = Path(__file__).resolve().parent


def create_app(
    config: Config,
    db: Database,
    healthy: Callable[[], bool] = lambda: True,
    on_signed: Callable[[datetime | None], None] | None = None,
) -> Flask:
    app = Flask(__name__, template_folder=str(HERE / "templates"),
                static_folder=str(HERE / "static"))  # fmt: skip
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024  # forms only
    accounts = AccountService(db, config.web)
    app.extensions["secondreader"] = Site(
        config, db, accounts, ReviewService(db, config), on_signed or (lambda _due: None)
    )
    web = config.web
    app.jinja_env.globals.update(percent=percent, threshold_percent=threshold_percent)

    def address() -> str:
        return str(request.remote_addr or "")

    @app.before_request
    def identify() -> Any:
        g.user, g.csrf, g.token = None, None, None
        token = request.cookies.get(COOKIE)
        if token:
            found = accounts.session(token)
            if found is not None:
                g.user, g.csrf, g.token = found.user, found.csrf_token, token
        named = request.headers.get(web.proxy_user_header) if web.proxy_user_header else None
        if g.user is None and named and address() in web.trusted_proxies:
            # Single sign-on: only a configured proxy may name the user.
            token = accounts.login_trusted(named, address())
            if token is not None:
                found = accounts.session(token)
                if found is not None:
                    g.user, g.csrf, g.token = found.user, found.csrf_token, token
                    g.new_token = token
        if request.method == "POST" and request.endpoint != "login":
            sent = request.form.get("csrf", "")
            if g.csrf is None or not hmac.compare_digest(sent, g.csrf):
                abort(400, "invalid or missing CSRF token: open the page again")
        return None

    @app.after_request
    def headers(response: Any) -> Any:
        new = getattr(g, "new_token", None)
        if new:
            _set_cookie(response, new, web.secure_cookies)
        response.headers["Cache-Control"] = "no-store"  # pages name patients
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = "default-src 'self'"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.errorhandler(HTTPException)
    def error_page(exc: HTTPException) -> Any:
        # An error page the reader can leave: the worklist, or back.
        return render_template("error.html", code=exc.code, title=exc.name,
                               message=exc.description), exc.code or 500  # fmt: skip

    @app.get("/healthz")
    def healthz() -> Any:
        return ("ok\n", 200) if healthy() else ("unhealthy\n", 503)

    @app.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        error = None
        if request.method == "POST":
            token = accounts.login(
                request.form.get("username", ""), request.form.get("password", ""), address()
            )
            if token is not None:
                response = redirect(url_for("worklist.worklist"))
                _set_cookie(response, token, web.secure_cookies)
                return response
            error = "Wrong user name or password."
            until = accounts.locked_until(request.form.get("username", ""))
            if until is not None:
                minutes = max(1, round((until - utcnow()).total_seconds() / 60))
                error = (f"This account is locked after too many wrong passwords: try again in "
                         f"{minutes} minute(s), or ask an administrator to unlock it.")  # fmt: skip
        return render_template("login.html", error=error), 401 if error else 200

    @app.post("/logout")
    @login_required
    def logout() -> Any:
        accounts.logout(g.token, g.user.username, address())
        response = redirect(url_for("login"))
        response.delete_cookie(COOKIE)
        return response

    from daemon.web import admin, drift, monitoring, result, viewer, worklist

    blueprints = (worklist.bp, result.bp, viewer.bp, admin.bp, monitoring.bp, drift.bp)
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    return app


def login_required(view: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if g.user is None:
            return redirect(url_for("login"))
        return view(*args, **kwargs)

    return wrapped


def admin_required(view: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if g.user is None:
            return redirect(url_for("login"))
        if g.user.role != "admin":
            abort(403, "This page is for administrators.")
        return view(*args, **kwargs)

    return wrapped


def _set_cookie(response: Any, token: str, secure: bool) -> None:
    response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=secure, path="/")
