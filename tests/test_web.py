"""The review web page's security and its review path, through Flask's test client.

A real database with a reported AI result (the report stage's own calls),
real argon2 accounts made by the CLI's service, and the review service
behind the forms: what a browser would send, without the browser.
"""

from __future__ import annotations

import io
import logging
import re
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from flask.testing import FlaskClient
from PIL import Image
from pydicom import dcmread
from sqlalchemy import select, update

from daemon.accounts import AccountError, AccountService
from daemon.config import Config, load_config
from daemon.reporter import Reporter
from daemon.web import COOKIE, create_app
from db import audit, migrate
from db.audit import EventType
from db.models import FindingDecision, Job, OutboxItem, WebSession, utcnow
from db.session import Database
from tests import reportdata as rd
from tests.dicomgen import PATIENT_ID, PATIENT_NAME, storescp

KEY = bytes(range(32))
PASSWORD = "correct horse battery"


def make(tmp_path: Path, web: str = "") -> tuple[Config, Database]:
    path = tmp_path / "secondreader.toml"
    path.write_text(
        f"""
[storage]
state_dir = "{tmp_path / "state"}"
fsync = false

[database]
url = "sqlite:///{tmp_path / "db.sqlite"}"

[review]
organization = "Test Hospital Radiology"

[web]
enabled = true
{web}

[[delivery.destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 11112
"""
    )
    config = load_config(path, environ={})
    migrate.upgrade(config.database_url)
    db = Database(config.database_url, audit_key=KEY)
    accounts = AccountService(db, config.web)
    accounts.add("smith", PASSWORD, "reviewer", "test", full_name="Smith^Jane")
    accounts.add("root", PASSWORD, "admin", "test")
    files = rd.ct_study(tmp_path / "ct")
    study_uid = rd.receive(db, config.storage.spool_dir, files)
    rd.record_analysis(db, config.storage.state_dir, study_uid, [rd.analysed(files)])
    assert Reporter(db, config).run_once() == 1
    return config, db


@pytest.fixture
def site(tmp_path: Path):  # type: ignore[no-untyped-def]
    config, db = make(tmp_path)
    app = create_app(config, db)
    yield app, db
    db.dispose()


def login(client: FlaskClient, user: str = "smith", password: str = PASSWORD):  # type: ignore[no-untyped-def]
    return client.post("/login", data={"username": user, "password": password})


def csrf(client: FlaskClient, page: str = "/") -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', client.get(page).get_data(as_text=True))
    assert match, "no CSRF token on the page"
    return match.group(1)


def test_every_page_but_login_and_health_needs_a_session(site) -> None:  # type: ignore[no-untyped-def]
    app, _db = site
    client = app.test_client()
    for page in ("/", "/results/1", "/admin"):
        rsp = client.get(page)
        assert rsp.status_code == 302 and rsp.headers["Location"].endswith("/login"), page
    assert client.post("/results/1/decide", data={"decision": "confirm"}).status_code == 400
    assert client.get("/login").status_code == 200
    assert client.get("/healthz").status_code == 200


def test_login_review_and_logout(site, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app, db = site
    client = app.test_client()
    caplog.set_level(logging.DEBUG)
    rsp = login(client)
    assert rsp.status_code == 302
    cookie = client.get_cookie(COOKIE)
    assert cookie is not None and cookie.http_only and cookie.same_site == "Strict"

    worklist = client.get("/").get_data(as_text=True)
    assert "#1" in worklist and "Nodule present" in worklist
    date = str(dcmread(next((tmp_path / "ct").glob("*.dcm")), stop_before_pixels=True).StudyDate)
    assert f"<td>{date[:4]}-{date[4:6]}-{date[6:]}</td>" in worklist and " min</td>" in worklist
    assert "Nothing to review" in client.get("/?since=2999-01-01").get_data(as_text=True)
    assert client.get("/?since=not-a-date").status_code == 400
    page = client.get("/results/1").get_data(as_text=True)
    assert PATIENT_NAME in page and PATIENT_ID in page  # for the logged-in reviewer only
    assert "NOT VERIFIED" in page
    # How the AI came to it: the algorithm's parameters and the preprocessing steps.
    assert 'id="provenance"' in page and "threshold" in page
    assert "<td>window</td>" in page  # rd.analysed's preprocessing step

    # A form posted without the session's CSRF token is refused.
    refused = client.post("/results/1/decide", data={"decision": "confirm", "finding": "1"})
    assert refused.status_code == 400
    token = csrf(client, "/results/1")
    rsp = client.post(
        "/results/1/decide",
        data={"decision": "confirm", "finding": "1", "comment": "solid", "csrf": token},
    )
    assert rsp.status_code == 302 and "/results/1" in rsp.headers["Location"]
    with db.session() as s:
        kinds = {i.object_kind for i in s.scalars(select(OutboxItem))}
        decided = audit.events(s, EventType.REVIEW_DECIDED)
    assert "verified-sr" in kinds  # the verified SR is queued for the PACS
    assert [e.actor for e in decided] == ["Smith^Jane"]  # under the logged-in user
    after = client.get("/results/1").get_data(as_text=True)
    assert "confirm by Smith^Jane" in after and "Physician reviewed" in after

    assert client.post("/logout", data={"csrf": token}).status_code == 302
    assert client.get("/").status_code == 302  # the session is over
    # Nothing of the patient in any log line.
    for record in caplog.records:
        assert PATIENT_NAME not in record.getMessage() and PATIENT_ID not in record.getMessage()


def test_a_reviewer_cannot_reach_the_admin_pages(site) -> None:  # type: ignore[no-untyped-def]
    app, _db = site
    reviewer, admin = app.test_client(), app.test_client()
    login(reviewer)
    login(admin, "root")
    assert reviewer.get("/admin").status_code == 403
    assert admin.get("/admin").status_code == 200


def test_five_wrong_passwords_lock_the_account(site) -> None:  # type: ignore[no-untyped-def]
    app, db = site
    client = app.test_client()
    for _ in range(5):
        assert login(client, password="wrong password!").status_code == 401
    # Locked: even the right password is refused now.
    assert login(client).status_code == 401
    assert client.get("/").status_code == 302
    with db.session() as s:
        locked = audit.events(s, EventType.LOGIN_LOCKED)
        failed = audit.events(s, EventType.LOGIN_FAILED)
    assert [e.actor for e in locked] == ["smith"]
    assert failed[-1].detail["reason"] == "locked"
    # Another account is not affected.
    assert login(app.test_client(), "root").status_code == 302


def test_an_idle_session_expires(site) -> None:  # type: ignore[no-untyped-def]
    app, db = site
    client = app.test_client()
    login(client)
    assert client.get("/").status_code == 200
    with db.session() as s:
        s.execute(update(WebSession).values(last_seen_at=utcnow() - timedelta(hours=2)))
    assert client.get("/").status_code == 302


def test_a_proxy_header_counts_only_from_a_trusted_proxy(tmp_path: Path) -> None:
    config, db = make(
        tmp_path, 'trusted_proxies = ["10.9.8.7"]\nproxy_user_header = "X-Remote-User"'
    )
    app = create_app(config, db)
    header = {"X-Remote-User": "smith"}
    stranger = app.test_client()
    rsp = stranger.get("/", headers=header, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert rsp.status_code == 302  # ignored: not from the proxy
    proxy = app.test_client()
    rsp = proxy.get("/", headers=header, environ_base={"REMOTE_ADDR": "10.9.8.7"})
    assert rsp.status_code == 200 and "smith (reviewer)" in rsp.get_data(as_text=True)
    db.dispose()


def test_accounts_refuse_weak_passwords_and_duplicates(site) -> None:  # type: ignore[no-untyped-def]
    _app, db = site
    from daemon.config import WebConfig

    accounts = AccountService(db, WebConfig())
    with pytest.raises(AccountError, match="12 characters"):
        accounts.add("jones", "short", "reviewer", "test")
    with pytest.raises(AccountError, match="exists"):
        accounts.add("smith", PASSWORD, "reviewer", "test", full_name="Smith^Jane")
    accounts.disable("smith", "test")
    assert accounts.login("smith", PASSWORD, "127.0.0.1") is None


def test_key_image_overlay_and_a_correction_by_click(site) -> None:  # type: ignore[no-untyped-def]
    app, db = site
    client = app.test_client()
    login(client)
    page = client.get("/results/1").get_data(as_text=True)
    # The key image by default: the middle slice of 6 (rd.analysed), with its box.
    assert "Image 4 of 6" in page and 'id="key-image"' in page
    plain = client.get("/results/1/image.png?slice=3")
    assert plain.status_code == 200 and plain.mimetype == "image/png"
    picture = np.asarray(Image.open(io.BytesIO(plain.data)).convert("RGB")).astype(int)
    assert picture.shape == (64, 64, 3)
    yellow = (picture[..., 0] > 200) & (picture[..., 1] > 180) & (picture[..., 2] < 80)
    assert yellow.any()  # the AI's box
    overlaid = client.get("/results/1/image.png?slice=3&overlay=1").data
    assert overlaid != plain.data  # the saliency map, blended in
    other = np.asarray(Image.open(io.BytesIO(client.get("/results/1/image.png?slice=0").data)))
    assert not ((other[..., 0] > 200) & (other[..., 1] > 180) & (other[..., 2] < 80)).any()
    assert client.get("/results/1/image.png", headers={}).status_code == 200

    # The reviewer clicks the true location on slice 2 (0-based 1).
    token = csrf(client, "/results/1?slice=1")
    rsp = client.post(
        "/results/1/correct",
        data={"csrf": token, "finding": "1", "slice": "1", "click.x": "40", "click.y": "12"},
    )
    assert rsp.status_code == 302
    with db.session() as s:
        (decision,) = s.scalars(select(FindingDecision)).all()
    assert decision.decision == "correct" and decision.reviewer == "Smith^Jane"
    assert decision.location["point"] == {"col": 40.0, "row": 12.0}
    # On the image shown when clicking (the slice before the key image), not the key image.
    with db.session() as s:
        from db.reviews import series_images

        rows, _ = series_images(s, 1)
    assert decision.location["sop_instance_uid"] in {uid for uid, _ in rows}
    assert decision.location["sop_instance_uid"] != rd_key_image(db)
    anonymous = app.test_client().get("/results/1/image.png")
    assert anonymous.status_code == 302  # pictures of a patient need a session too


def rd_key_image(db: Database) -> str:
    """The SOP Instance UID of the run's finding (rd.analysed: the middle slice)."""
    from db.models import FindingRecord

    with db.session() as s:
        (uid,) = s.scalars(select(FindingRecord.sop_instance_uid)).all()
    return str(uid)


def test_operations_and_monitoring_are_for_admins_and_work(tmp_path: Path) -> None:
    with storescp(tmp_path / "pacs") as pacs_port:
        config, db = make(tmp_path, "")
        # The PACS of the config is dcmtk's storescp here, for a real C-ECHO.
        config.delivery.destinations[0].port = pacs_port
        config.delivery.destinations[0].ae_title = "STORESCP"
        app = create_app(config, db)
        reviewer, admin = app.test_client(), app.test_client()
        login(reviewer)
        login(admin, "root")
        token = csrf(reviewer)
        for action in ("/admin/reports/retry", "/admin/deliveries/retry", "/admin/echo/pacs",
                       "/admin/jobs/retry"):  # fmt: skip
            assert reviewer.post(action, data={"csrf": token}).status_code == 403, action
        for page in ("/admin/monitoring", "/admin/monitoring.png"):
            assert reviewer.get(page).status_code == 403

        admin_token = csrf(admin, "/admin")
        assert admin.post("/admin/echo/pacs").status_code == 400  # no CSRF token
        rsp = admin.post("/admin/echo/pacs", data={"csrf": admin_token}, follow_redirects=True)
        assert "pacs: C-ECHO status 0x0000 (success)" in rsp.get_data(as_text=True)

        # A dead letter, sent again from the page.
        with db.session() as s:
            s.execute(update(OutboxItem).values(state="dead"))
        page = admin.get("/admin").get_data(as_text=True)
        assert 'id="retry-deliveries"' in page
        rsp = admin.post("/admin/deliveries/retry", data={"csrf": admin_token},
                         follow_redirects=True)  # fmt: skip
        assert "dead letter(s) queued again" in rsp.get_data(as_text=True)
        with db.session() as s:
            assert {i.state for i in s.scalars(select(OutboxItem))} == {"pending"}
            requeued = audit.events(s, EventType.DELIVERY_REQUEUED)
        assert requeued and {e.actor for e in requeued} == {"root"}

        # A failed job, analysed again from the page.
        with db.session() as s:
            s.execute(update(Job).values(state="failed", attempts=3))
        assert 'id="retry-jobs"' in admin.get("/admin").get_data(as_text=True)
        admin.post("/admin/jobs/retry", data={"csrf": admin_token})
        with db.session() as s:
            assert {(j.state, j.attempts) for j in s.scalars(select(Job))} == {("queued", 0)}
            assert [e.actor for e in audit.events(s, EventType.JOB_REQUEUED)] == ["root"]

        # Monitoring: a decision shows in the table, and the plot is a picture.
        token = csrf(reviewer, "/results/1")
        reviewer.post("/results/1/decide", data={"decision": "reject", "finding": "1",
                                                 "csrf": token})  # fmt: skip
        table = admin.get("/admin/monitoring").get_data(as_text=True)
        assert "secondreader-test" in table or "overall" in table
        assert re.search(r"<td>overall</td><td>0</td><td>1</td><td>0</td>", table), table
        plot = admin.get("/admin/monitoring.png")
        assert plot.status_code == 200 and plot.data[:8] == b"\x89PNG\r\n\x1a\n"
        db.dispose()


def test_healthz_fails_when_the_daemon_is_not_healthy(tmp_path: Path) -> None:
    config, db = make(tmp_path)
    dead = create_app(config, db, healthy=lambda: False).test_client()
    assert dead.get("/healthz").status_code == 503
    alive = create_app(config, db, healthy=lambda: True).test_client()
    assert alive.get("/healthz").status_code == 200
    db.dispose()
