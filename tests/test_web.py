"""The review web page's security and its review path, through Flask's test client.

A real database with a reported AI result (the report stage's own calls),
real argon2 accounts made by the CLI's service, and the review service
behind the forms: what a browser would send, without the browser.
"""

from __future__ import annotations

import html
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
from daemon.config import Config
from daemon.stages.report import Reporter
from daemon.web import COOKIE, create_app
from db import audit, migrate
from db.audit import EventType
from db.models import FindingDecision, Job, OutboxItem, WebSession, utcnow
from db.session import Database
from tests import reportdata as rd
from tests.configs import write_config
from tests.dicomgen import PATIENT_ID, PATIENT_NAME, storescp

KEY = bytes(range(32))
PASSWORD = "correct horse battery"


def make(tmp_path: Path, web: str = "") -> tuple[Config, Database]:
    config = write_config(
        tmp_path,
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        f"""
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
""",
    )
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
def site(tmp_path: Path):
    config, db = make(tmp_path)
    app = create_app(config, db)
    yield app, db
    db.dispose()


def login(client: FlaskClient, user: str = "smith", password: str = PASSWORD):
    return client.post("/login", data={"username": user, "password": password})


def sign_fields(page: str) -> dict[str, str]:
    """The hidden fields of the sign page's form, as the browser sends them."""
    form = page[page.index('id="sign-form"'):]
    fields = dict(re.findall(r'name="(csrf|mode|reason|payload|digest)" value="([^"]*)"', form))
    return {k: html.unescape(v) for k, v in fields.items()}


def decide(client: FlaskClient, run: int, **choices: str) -> str:
    """Choose (`decision-1="confirm"`, ...) and sign, as a reader does; the sign page's text."""
    token = csrf(client, f"/results/{run}")
    shown = client.post(f"/results/{run}/prepare", data={"csrf": token, "mode": "decide",
                                                         **choices})  # fmt: skip
    assert shown.status_code == 200, shown.get_data(as_text=True)
    text = shown.get_data(as_text=True)
    rsp = client.post(f"/results/{run}/sign", data={**sign_fields(text), "after": "stay"})
    assert rsp.status_code == 302, rsp.get_data(as_text=True)
    return text


def csrf(client: FlaskClient, page: str = "/") -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', client.get(page).get_data(as_text=True))
    assert match, "no CSRF token on the page"
    return match.group(1)


def test_every_page_but_login_and_health_needs_a_session(site) -> None:
    app, _db = site
    client = app.test_client()
    for page in ("/", "/results/1", "/admin"):
        rsp = client.get(page)
        assert rsp.status_code == 302 and rsp.headers["Location"].endswith("/login"), page
    assert client.post("/results/1/prepare", data={"decision-1": "confirm"}).status_code == 400
    assert client.post("/results/1/sign", data={"mode": "decide"}).status_code == 400
    assert client.get("/login").status_code == 200
    assert client.get("/healthz").status_code == 200


def test_login_review_and_logout(site, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
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
    assert f'<td class="date">{date[:4]}-{date[4:6]}-{date[6:]}</td>' in worklist
    assert " min</td>" in worklist
    assert "Nothing to review" in client.get("/?since=2999-01-01").get_data(as_text=True)
    assert client.get("/?since=not-a-date").status_code == 400
    page = client.get("/results/1").get_data(as_text=True)
    assert PATIENT_NAME in page and PATIENT_ID in page  # for the logged-in reviewer only
    assert "NOT VERIFIED" in page
    # How the AI came to it: the algorithm's parameters and the preprocessing steps.
    assert 'id="provenance"' in page and "threshold" in page
    # In words, not Python dicts; the device UID named as DICOM names it.
    assert "<dt>Window</dt><dd>window centre 40, width 400</dd>" in page  # rd.analysed's step
    assert "<dt>Device Observer UID</dt>" in page and "{&#39;" not in page and "{'" not in page
    # What the model is worth, from its manifest's shifted-generator evaluation.
    assert "<dt>Evaluation: Sensitivity</dt><dd>0.85 (17/20; 95 % CI 0.64-0.95)</dd>" in page
    # History in clinical terms; the internal events only for administrators.
    assert "AI result reported" in page and "job.claimed" not in page
    assert "audit-events" not in page

    # A form posted without the session's CSRF token is refused.
    refused = client.post("/results/1/prepare", data={"decision-1": "confirm"})
    assert refused.status_code == 400
    token = csrf(client, "/results/1")
    # Step one, the choice: nothing is recorded, the sign page says what would go.
    shown = client.post(
        "/results/1/prepare",
        data={"csrf": token, "mode": "decide", "decision-1": "confirm", "comment-1": "solid"},
    )
    text = shown.get_data(as_text=True)
    assert shown.status_code == 200 and 'id="sign"' in text
    assert "CONFIRMED: stated present" in text and "Smith^Jane" in text and "solid" in text
    assert "FINAL, VERIFIED SR" in text and "pacs (PACS)" in text
    with db.session() as s:
        assert s.scalars(select(FindingDecision)).all() == []
    # Step two, Sign: the decision is recorded; the verified SR waits for the undo window.
    rsp = client.post("/results/1/sign", data={**sign_fields(text), "after": "stay"})
    assert rsp.status_code == 302 and "/results/1" in rsp.headers["Location"]
    with db.session() as s:
        kinds = {i.object_kind for i in s.scalars(select(OutboxItem))}
        decided = audit.events(s, EventType.REVIEW_DECIDED)
    assert "verified-sr" not in kinds  # held: Undo still works
    assert [e.actor for e in decided] == ["Smith^Jane"]  # under the logged-in user
    assert 'id="undo"' in client.get("/results/1").get_data(as_text=True)
    reviews = app.extensions["secondreader"].reviews
    assert reviews.finalize_pending(utcnow() + timedelta(seconds=11)) == 1  # the window is over
    with db.session() as s:
        kinds = {i.object_kind for i in s.scalars(select(OutboxItem))}
    assert "verified-sr" in kinds  # the verified SR is queued for the PACS
    after = client.get("/results/1").get_data(as_text=True)
    assert "confirm by Smith^Jane" in after and "Physician reviewed" in after
    assert 'id="undo"' not in after

    assert client.post("/logout", data={"csrf": token}).status_code == 302
    assert client.get("/").status_code == 302  # the session is over
    # Nothing of the patient in any log line.
    for record in caplog.records:
        assert PATIENT_NAME not in record.getMessage() and PATIENT_ID not in record.getMessage()


def test_a_reviewer_cannot_reach_the_admin_pages(site) -> None:
    app, _db = site
    reviewer, admin = app.test_client(), app.test_client()
    login(reviewer)
    login(admin, "root")
    assert reviewer.get("/admin").status_code == 403
    assert admin.get("/admin").status_code == 200


def test_five_wrong_passwords_lock_the_account(site) -> None:
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


def test_a_locked_user_is_told_to_wait_and_an_admin_unlocks(site, caplog) -> None:
    app, _db = site
    accounts = app.extensions["secondreader"].accounts
    client = app.test_client()
    caplog.set_level(logging.WARNING)
    for _ in range(5):
        login(client, password="wrong password!")
    page = login(client).get_data(as_text=True)
    assert "locked after too many wrong passwords: try again in 15 minute(s)" in page
    assert any("account smith locked for 15 min" in r.getMessage() for r in caplog.records)
    assert accounts.locked_until("smith") is not None
    accounts.unlock("smith", "test")
    assert login(client).status_code == 302
    # Disabled, then enabled again: the same account, not a new one.
    accounts.disable("smith", "test")
    assert login(app.test_client()).status_code == 401
    accounts.enable("smith", "test")
    assert login(app.test_client()).status_code == 302
    assert [u.disabled for u in accounts.users() if u.username == "smith"] == [False]


def test_an_idle_session_expires(site) -> None:
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


def test_accounts_refuse_weak_passwords_and_duplicates(site) -> None:
    _app, db = site
    from daemon.config import WebConfig

    accounts = AccountService(db, WebConfig())
    with pytest.raises(AccountError, match="12 characters"):
        accounts.add("jones", "short", "reviewer", "test")
    with pytest.raises(AccountError, match="exists"):
        accounts.add("smith", PASSWORD, "reviewer", "test", full_name="Smith^Jane")
    accounts.disable("smith", "test")
    assert accounts.login("smith", PASSWORD, "127.0.0.1") is None


def test_key_image_overlay_and_a_correction_by_marker(site) -> None:
    app, db = site
    client = app.test_client()
    login(client)
    page = client.get("/results/1").get_data(as_text=True)
    # Without JavaScript: the key image, the middle slice of 6 (rd.analysed), with its box.
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

    # The viewer's data: slices in order, the key image, the AI's box, the presets.
    meta = client.get("/results/1/viewer.json").get_json()
    assert meta["slices"] == 6 and meta["key"] == 3 and (meta["rows"], meta["columns"]) == (64, 64)
    (finding,) = meta["findings"]
    assert finding["slice"] == 3 and finding["present"] and len(finding["box"]) == 4
    assert meta["uids"][3] == rd_key_image(db)
    assert [p["key"] for p in meta["presets"]][-5:] == ["lung", "mediastinum", "bone", "brain",
                                                       "auto"]  # fmt: skip
    raw = client.get("/results/1/slices/3.bin")
    assert raw.headers["X-Dtype"] == "int16" and len(raw.data) == 64 * 64 * 2
    from daemon.web.site import site as current_site  # noqa: F401 (the app's own reader)
    from dicom_io.pixels import read_modality_pixels

    with app.app_context():
        path = app.extensions["secondreader"].series(1)[3].path
    expected = np.rint(read_modality_pixels(path)).astype("<i2")
    assert np.array_equal(np.frombuffer(raw.data, dtype="<i2").reshape(64, 64), expected)
    assert client.get("/results/1/slices/6.bin").status_code == 404
    assert client.get(f"/results/1/saliency/{meta['saliency'][0]}.bin").status_code == 200

    # A correction: the marker outside the image is refused, then placed on slice 2.
    token = csrf(client, "/results/1")
    outside = client.post("/results/1/prepare", data={
        "csrf": token, "mode": "decide", "decision-1": "correct", "slice-1": meta["uids"][1],
        "col-1": "70", "row-1": "12"})  # fmt: skip
    assert outside.status_code == 400 and "outside the image" in outside.get_data(as_text=True)
    unplaced = client.post("/results/1/prepare", data={
        "csrf": token, "mode": "decide", "decision-1": "correct"})  # fmt: skip
    assert unplaced.status_code == 400 and "place the marker" in unplaced.get_data(as_text=True)
    text = decide(client, 1, **{"decision-1": "correct", "slice-1": meta["uids"][1],
                                "col-1": "40", "row-1": "12"})  # fmt: skip
    assert "CORRECTED: stated present at column 40, row 12 of image 2 of 6" in text
    with db.session() as s:
        (decision,) = s.scalars(select(FindingDecision)).all()
    assert decision.decision == "correct" and decision.reviewer == "Smith^Jane"
    assert decision.location["point"] == {"col": 40.0, "row": 12.0}
    assert decision.location["sop_instance_uid"] == meta["uids"][1] != rd_key_image(db)
    # The earlier decision is drawn by the viewer where it was placed.
    (drawn,) = client.get("/results/1/viewer.json").get_json()["decisions"]
    assert drawn["slice"] == 1 and drawn["point"] == [40.0, 12.0]
    anonymous = app.test_client().get("/results/1/image.png")
    assert anonymous.status_code == 302  # pictures of a patient need a session too
    assert app.test_client().get("/results/1/slices/0.bin").status_code == 302


def test_a_tampered_sign_form_signs_nothing(site) -> None:
    app, db = site
    client = app.test_client()
    login(client)
    token = csrf(client, "/results/1")
    shown = client.post("/results/1/prepare", data={"csrf": token, "mode": "decide",
                                                    "decision-1": "confirm"})  # fmt: skip
    fields = sign_fields(shown.get_data(as_text=True))
    # The page showed "confirm": a form that says "reject" was never reviewed.
    forged = {**fields, "payload": fields["payload"].replace("confirm", "reject")}
    assert client.post("/results/1/sign", data=forged).status_code == 400
    # Nothing chosen: nothing to review.
    empty = client.post("/results/1/prepare", data={"csrf": token, "mode": "decide"})
    assert empty.status_code == 400
    with db.session() as s:
        assert s.scalars(select(FindingDecision)).all() == []


def test_undo_inside_the_window_and_too_late_after_it(site) -> None:
    app, db = site
    client = app.test_client()
    login(client)
    reviews = app.extensions["secondreader"].reviews
    decide(client, 1, **{"decision-1": "reject", "comment-1": "vessel"})
    rsp = client.post("/results/1/undo", data={"csrf": csrf(client, "/results/1")})
    assert rsp.status_code == 302 and "undone=1" in rsp.headers["Location"]
    with db.session() as s:
        assert s.scalars(select(FindingDecision)).all() == []
        (undone,) = audit.events(s, EventType.REVIEW_UNDONE)
    assert undone.actor == "Smith^Jane" and undone.detail["findings"] == [1]
    assert reviews.finalize_pending(utcnow() + timedelta(minutes=5)) == 0  # nothing to send
    history = client.get("/results/1").get_data(as_text=True)
    assert "undone by Smith^Jane; nothing was sent" in history
    # Decided again, and past the window: the SR is built, and undo is too late.
    decide(client, 1, **{"decision-1": "confirm"})
    assert reviews.finalize_pending(utcnow() + timedelta(seconds=11)) == 1
    late = client.post("/results/1/undo", data={"csrf": csrf(client, "/results/1")})
    assert late.status_code == 409 and "too late to undo" in late.get_data(as_text=True)
    assert 'id="back-result"' in late.get_data(as_text=True)  # an error page with a way back
    with db.session() as s:
        assert [d.decision for d in s.scalars(select(FindingDecision))] == ["confirm"]


def test_amend_on_the_page_needs_a_reason_and_supersedes(site) -> None:
    app, db = site
    client = app.test_client()
    login(client)
    reviews = app.extensions["secondreader"].reviews
    decide(client, 1, **{"decision-1": "confirm"})
    reviews.finalize_pending(utcnow() + timedelta(seconds=11))
    token = csrf(client, "/results/1")
    page = client.get("/results/1").get_data(as_text=True)
    assert 'id="amend"' in page and 'id="review-sign"' not in page
    no_reason = client.post("/results/1/prepare", data={
        "csrf": token, "mode": "amend", "amend-decision-1": "reject", "reason": " "})  # fmt: skip
    assert no_reason.status_code == 400
    shown = client.post("/results/1/prepare", data={
        "csrf": token, "mode": "amend", "amend-decision-1": "reject",
        "reason": "vessel seen end-on"})  # fmt: skip
    text = shown.get_data(as_text=True)
    assert "REJECTED: stated absent" in text and "vessel seen end-on" in text
    assert "superseding the last verified SR" in text
    rsp = client.post("/results/1/sign", data={**sign_fields(text), "after": "stay"})
    assert rsp.status_code == 302
    with db.session() as s:
        verified = [i for i in s.scalars(select(OutboxItem)) if i.object_kind == "verified-sr"]
    assert len(verified) == 2  # the amendment's SR, at once
    after = client.get("/results/1").get_data(as_text=True)
    assert "reason: <span class=\"reason-text\">vessel seen end-on</span>" in after
    assert "amended to rejected by Smith^Jane" in after
    # The first decision page is stale now: deciding again says who verified it.
    stale = client.post("/results/1/prepare", data={"csrf": token, "mode": "decide",
                                                    "decision-1": "confirm"})  # fmt: skip
    assert stale.status_code == 409 and "by Smith^Jane" in stale.get_data(as_text=True)


def test_worklist_matches_the_pacs_and_sorts(site) -> None:
    app, _db = site
    client = app.test_client()
    login(client)
    page = client.get("/").get_data(as_text=True)
    for column in ("Patient", "Patient ID", "Accession", "Study date", "Priority"):
        assert f">{column}" in page, column
    assert PATIENT_NAME in page and PATIENT_ID in page
    assert '<td class="priority">high</td>' in page
    assert 'http-equiv="refresh"' in page
    by_patient = client.get("/?sort=patient&order=desc")
    assert by_patient.status_code == 200 and 'aria-sort="descending"' in by_patient.get_data(
        as_text=True)
    assert client.get("/?sort=nonsense").status_code == 400
    # Next case: the first pending result; none after it: back to the worklist.
    assert client.get("/next").headers["Location"].endswith("/results/1")
    assert client.get("/next?after=1").headers["Location"].endswith("/")
    missing = client.get("/results/99")
    assert missing.status_code == 404 and 'id="back-worklist"' in missing.get_data(as_text=True)


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
        decide(reviewer, 1, **{"decision-1": "reject"})
        table = admin.get("/admin/monitoring").get_data(as_text=True)
        assert "secondreader-test" in table or "overall" in table
        # AI present: confirmed 0, corrected 0, rejected 1; PPV 0 of 1; the columns add up.
        assert re.search(r"<td>overall</td>\s*<td>0</td><td>0</td><td>1</td>\s*<td>0.00 \(0/1\)",
                         table), table  # fmt: skip
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
