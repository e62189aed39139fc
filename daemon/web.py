"""The review web page: server-rendered (Flask, Jinja2), no front-end build.

Pages: the login, the worklist (pending AI results in triage order, with
filters), a result (its findings in words, the patient for the logged-in
reviewer, the decision forms), the admin overview, and /healthz for load
balancers. Every decision goes through the review service
(daemon/reviewer.py) under the logged-in user's name, as the CLI's do.

Security: every page but the login and /healthz needs a session
(daemon/accounts.py); admin pages need the admin role; every POST carries the
session's CSRF token; the session cookie is HttpOnly and SameSite=Strict
(Secure with `web.secure_cookies`). URLs carry run numbers only, never a
patient attribute, and nothing here logs a request line.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import wraps
from pathlib import Path
from typing import Any

from flask import Flask, abort, g, redirect, render_template, request, url_for
from pydicom import dcmread

from daemon.accounts import AccountService
from daemon.config import Config
from daemon.dispatcher import Dispatcher
from daemon.reviewer import Correction, ReviewError, ReviewService
from daemon.web_images import SeriesImage, agreement_plot, in_slice_order, render, scale_of
from db.jobs import read_saliency, recent_workers, requeue_failed_jobs, running_jobs
from db.models import utcnow
from db.outbox import list_items, requeue_dead
from db.reports import requeue_failed_reports
from db.reviews import run_provenance, series_images
from db.session import Database
from db.studies import pipeline_counts
from dicom_io.scu import echo
from dicom_io.wording import percent, threshold_percent

COOKIE = "secondreader_session"
TEMPLATES = Path(__file__).resolve().parent / "web_templates"
STATIC = Path(__file__).resolve().parent / "web_static"


def create_app(config: Config, db: Database, healthy: Callable[[], bool] = lambda: True) -> Flask:
    app = Flask(__name__, template_folder=str(TEMPLATES), static_folder=str(STATIC))
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024  # forms only
    accounts = AccountService(db, config.web)
    reviews = ReviewService(db, config)
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
                abort(400, "invalid or missing CSRF token")
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
                abort(403)
            return view(*args, **kwargs)

        return wrapped

    @app.get("/healthz")
    def healthz() -> Any:
        ok = healthy()
        return ("ok\n", 200) if ok else ("unhealthy\n", 503)

    @app.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        error = None
        if request.method == "POST":
            token = accounts.login(
                request.form.get("username", ""), request.form.get("password", ""), address()
            )
            if token is not None:
                response = redirect(url_for("worklist"))
                _set_cookie(response, token, web.secure_cookies)
                return response
            error = "Wrong user name or password, or the account is locked."
        return render_template("login.html", error=error), 401 if error else 200

    @app.post("/logout")
    @login_required
    def logout() -> Any:
        accounts.logout(g.token, g.user.username, address())
        response = redirect(url_for("login"))
        response.delete_cookie(COOKIE)
        return response

    @app.get("/")
    @login_required
    def worklist() -> Any:
        state = request.args.get("state", "pending")
        if state not in ("pending", "in_review", "decided", "all"):
            abort(400)
        since = None
        if request.args.get("since"):
            try:
                since = datetime.fromisoformat(request.args["since"])
            except ValueError:
                abort(400)
        results = reviews.results(
            state=None if state == "all" else state,
            modality=request.args.get("modality") or None,
            model=request.args.get("model") or None,
            since=since,
        )
        # Triage: a present finding first, then the most probable, then the oldest.
        results.sort(
            key=lambda r: (not any(f.present for f in r.findings), -r.top_probability,
                           r.created_at, r.run_id)
        )  # fmt: skip
        now = utcnow()
        rows = [
            (r, _study_date(config, r.study_instance_uid, r.ai_sr_sop_instance_uid),
             _age(now - r.created_at))
            for r in results
        ]  # fmt: skip
        return render_template("worklist.html", rows=rows, state=state)

    @app.get("/results/<int:run_id>")
    @login_required
    def result(run_id: int) -> Any:
        view, history = result_or_404(run_id)
        patient = _patient(config, view.study_instance_uid, view.ai_sr_sop_instance_uid)
        with db.session() as s:
            provenance = run_provenance(s, run_id)
        images = series(run_id)
        shown = chosen_slice(view, images) if images else None
        viewer = (
            web.viewer_url_template.format(study_uid=view.study_instance_uid)
            if web.viewer_url_template
            else None
        )
        return render_template(
            "result.html", r=view, history=history, patient=patient, viewer=viewer,
            message=request.args.get("done"), shown=shown, n_images=len(images),
            overlay=request.args.get("overlay") == "1", provenance=provenance,
        )  # fmt: skip

    def result_or_404(run_id: int) -> tuple[Any, list[dict[str, Any]]]:
        """The result and its history, or 404."""
        try:
            return reviews.show(run_id)
        except ReviewError:
            abort(404)

    series_cache: dict[int, list[SeriesImage]] = {}

    def series(run_id: int) -> list[SeriesImage]:
        """The run's analysed series in slice order (read once per run)."""
        if run_id not in series_cache:
            with db.session() as s:
                rows, _ = series_images(s, run_id)
            images = [SeriesImage(uid, config.storage.spool_dir / p) for uid, p in rows]
            present = [i for i in images if i.path.exists()]  # retention may have run
            if len(series_cache) > 32:
                series_cache.clear()
            series_cache[run_id] = in_slice_order(present)
        return series_cache[run_id]

    def key_slice(view: Any, images: list[SeriesImage]) -> int:
        uids = [i.sop_instance_uid for i in images]
        located = [f for f in view.findings if f.sop_instance_uid in uids]
        if not located:
            return len(images) // 2
        top = max(located, key=lambda f: f.probability)
        return uids.index(top.sop_instance_uid)

    def chosen_slice(view: Any, images: list[SeriesImage]) -> int:
        k = request.values.get("slice", type=int)
        if k is None:
            return key_slice(view, images)
        return min(max(k, 0), len(images) - 1)

    @app.get("/results/<int:run_id>/image.png")
    @login_required
    def image(run_id: int) -> Any:
        view, _ = result_or_404(run_id)
        images = series(run_id)
        if not images:
            abort(404)
        shown = images[chosen_slice(view, images)]
        box = None
        for f in view.findings:
            if f.present and f.sop_instance_uid == shown.sop_instance_uid and f.box:
                box = (f.box["col0"], f.box["row0"], f.box["col1"], f.box["row1"])
        overlay = None
        if request.args.get("overlay") == "1":
            overlay = _saliency_plane(config, db, run_id, shown.sop_instance_uid)
        png, _scale = render(shown.path, box, overlay)
        return app.response_class(png, mimetype="image/png")

    @app.post("/results/<int:run_id>/correct")
    @login_required
    def correct(run_id: int) -> Any:
        view, _ = result_or_404(run_id)
        images = series(run_id)
        finding = request.form.get("finding", type=int)
        x, y = request.form.get("click.x", type=float), request.form.get("click.y", type=float)
        if not images or finding is None or x is None or y is None:
            abort(400)
        shown = images[chosen_slice(view, images)]
        header = dcmread(shown.path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        scale = scale_of(int(header.Rows), int(header.Columns))
        point = (x / scale, y / scale)  # the click on the picture, in the image's pixels
        try:
            uid = reviews.decide(
                run_id, "correct", reviews.reviewer(g.user.full_name), finding=finding,
                comment=(request.form.get("comment") or "").strip() or None,
                correction=Correction(shown.sop_instance_uid, point=point),
            )  # fmt: skip
        except ReviewError as exc:
            return render_template("error.html", message=str(exc)), 409
        return redirect(url_for("result", run_id=run_id, done="verified" if uid else "decided"))

    @app.post("/results/<int:run_id>/decide")
    @login_required
    def decide(run_id: int) -> Any:
        decision = request.form.get("decision", "")
        if decision not in ("confirm", "reject"):
            abort(400)
        finding = request.form.get("finding", type=int)
        comment = (request.form.get("comment") or "").strip() or None
        try:
            uid = reviews.decide(
                run_id, decision, reviews.reviewer(g.user.full_name), finding=finding,
                comment=comment,
            )  # fmt: skip
        except ReviewError as exc:
            return render_template("error.html", message=str(exc)), 409
        return redirect(url_for("result", run_id=run_id, done="verified" if uid else "decided"))

    @app.get("/admin")
    @admin_required
    def admin() -> Any:
        with db.session() as s:
            counts = pipeline_counts(s)
            dead = list_items(s, state="dead", limit=50)
            running = running_jobs(s)
            workers = recent_workers(s, utcnow() - timedelta(hours=24))
        return render_template(
            "admin.html", counts=counts, users=accounts.users(), dead=dead,
            destinations=config.delivery.destinations, echo=request.args.get("echo"),
            done=request.args.get("done"), running=running, worker=config.worker,
            workers=workers,
        )  # fmt: skip

    @app.post("/admin/jobs/retry")
    @admin_required
    def retry_jobs() -> Any:
        with db.session() as s:
            n = requeue_failed_jobs(s, actor=g.user.username)
        return redirect(url_for("admin", done=f"{n} failed job(s) queued again"))

    @app.post("/admin/reports/retry")
    @admin_required
    def retry_reports() -> Any:
        with db.session() as s:
            runs = requeue_failed_reports(s, actor=g.user.username)
        return redirect(url_for("admin", done=f"{len(runs)} failed report(s) queued again"))

    @app.post("/admin/deliveries/retry")
    @admin_required
    def retry_deliveries() -> Any:
        with db.session() as s:
            n = requeue_dead(s, actor=g.user.username)
        return redirect(url_for("admin", done=f"{n} dead letter(s) queued again"))

    @app.post("/admin/echo/<name>")
    @admin_required
    def echo_destination(name: str) -> Any:
        dest = next((d for d in config.delivery.destinations if d.name == name), None)
        if dest is None:
            abort(404)
        try:
            status = echo(Dispatcher(db, config).remote(dest))
            text = f"{name}: C-ECHO status 0x{status:04X}" + (" (success)" if status == 0 else "")
        except Exception as exc:
            text = f"{name}: no answer ({type(exc).__name__})"
        return redirect(url_for("admin", echo=text))

    @app.get("/admin/monitoring")
    @admin_required
    def monitoring() -> Any:
        return render_template("monitoring.html", rows=reviews.stats())

    @app.get("/admin/monitoring.png")
    @admin_required
    def monitoring_plot() -> Any:
        return app.response_class(agreement_plot(reviews.stats()), mimetype="image/png")

    return app


def _set_cookie(response: Any, token: str, secure: bool) -> None:
    response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=secure, path="/")


def _ai_sr_header(config: Config, study_uid: str, sr_uid: str | None, tags: list[str]) -> Any:
    """Some attributes of the AI SR in the outbox, or None (no SR, or its file is gone)."""
    if sr_uid is None:
        return None
    path = config.storage.state_dir / "outbox" / study_uid / f"{sr_uid}.dcm"
    try:
        return dcmread(path, stop_before_pixels=True, specific_tags=tags)
    except (OSError, ValueError):
        return None


def _patient(config: Config, study_uid: str, sr_uid: str | None) -> dict[str, str]:
    """Name and ID from the AI SR: shown to the logged-in reviewer only."""
    ds = _ai_sr_header(config, study_uid, sr_uid, ["PatientName", "PatientID"])
    if ds is None:
        return {}
    return {"name": str(ds.get("PatientName", "")), "id": str(ds.get("PatientID", ""))}


def _saliency_plane(config: Config, db: Database, run_id: int, sop_uid: str) -> Any:
    """The run's saliency on one image, or None (no map there, or its file is gone)."""
    with db.session() as s:
        _, relative = series_images(s, run_id)
    if relative is None:
        return None
    try:
        saliency = read_saliency(config.storage.state_dir / relative)
    except (OSError, ValueError, KeyError):
        return None
    if sop_uid not in saliency.source_sop_instance_uids:
        return None
    return saliency.frames[saliency.source_sop_instance_uids.index(sop_uid)]


def _study_date(config: Config, study_uid: str, sr_uid: str | None) -> str:
    """The Study Date (YYYY-MM-DD) as the AI SR carries it, or ""."""
    ds = _ai_sr_header(config, study_uid, sr_uid, ["StudyDate"])
    value = "" if ds is None else str(ds.get("StudyDate", ""))
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 else value


def _age(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 48 * 60:
        return f"{minutes // 60} h"
    return f"{minutes // (24 * 60)} days"
