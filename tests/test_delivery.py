"""The deliver stage against real dcmtk storescp peers: once, retried, dead-lettered, re-queued.

The reporter builds the objects from runs recorded through the infer stage's
own calls; the dispatcher sends them to storescp (dcmtk), which plays a PACS
that works, one that is down, one that refuses SR, and one without storage
commitment. `secondreader status / deliveries` run as the real command line.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from daemon.config import Config, load_config
from daemon.stages.deliver import Dispatcher
from daemon.stages.report import Reporter
from db import audit, migrate
from db.audit import EventType
from db.chain import create_key
from db.models import DeliveryState, OutboxItem, utcnow
from db.outbox import RetryPolicy
from db.session import Database
from tests import reportdata as rd
from tests.configs import write_config
from tests.conftest import REPO, dcmtk_env, free_port, require_tool
from tests.dicom_validate import dciodvfy_errors

# A PACS that stores images and SEG but refuses every SR class.
NO_SR_PROFILE = r"""
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit

[[PresentationContexts]]
[ImagesAndSegOnly]
PresentationContext1 = VerificationSOPClass\Uncompressed
PresentationContext2 = CTImageStorage\Uncompressed
PresentationContext3 = SegmentationStorage\Uncompressed

[[Profiles]]
[NoSR]
PresentationContexts = ImagesAndSegOnly
"""


class StoreSCP:
    """dcmtk storescp writing what it receives to a folder, debug log kept."""

    def __init__(self, root: Path, port: int, *, refuse_sr: bool = False) -> None:
        self.root = root
        self.port = port
        self.out = root / "received"
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "storescp.log"
        self.extra: list[str] = []
        if refuse_sr:
            cfg = root / "no-sr.cfg"
            cfg.write_text(NO_SR_PROFILE)
            self.extra = ["-xf", str(cfg), "NoSR"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        cmd = [require_tool("storescp"), "-d", "-aet", "PACS", "-od", str(self.out)]
        self.proc = subprocess.Popen(
            [*cmd, *self.extra, str(self.port)],
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            env=dcmtk_env(),
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"storescp not listening:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def received_uids(self) -> list[str]:
        return sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.files())

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())


@pytest.fixture
def storescp_factory(tmp_path: Path):
    started: list[StoreSCP] = []

    def make(port: int, name: str = "pacs", **kwargs: bool) -> StoreSCP:
        scp = StoreSCP(tmp_path / f"{name}-{len(started)}", port, **kwargs)
        started.append(scp)
        return scp

    yield make
    for scp in started:
        scp.stop()


def make_config(tmp_path: Path, port: int, extra: str = "", db_url: str = "") -> Config:
    config = write_config(
        tmp_path,
        db_url,
        f"""
[delivery]
retry_base_seconds = 0.2
retry_max_seconds = 0.4
dead_letter_after_seconds = 1.5
{extra}

[[delivery.destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {port}
timeout_seconds = 5
# Two objects of two classes: what these tests of the dispatcher need.
outputs = ["sr", "seg"]
""",
    )
    config.storage.state_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(config.database_url)
    create_key(config.audit_key_path)  # as `secondreader db upgrade` does
    return config


def reported_study(tmp_path: Path, config: Config, db: Database) -> str:
    """A received CT with an analysed run, reported: SR + SEG in the outbox."""
    files = rd.ct_study(tmp_path / "ct")
    study_uid = rd.receive(db, config.storage.spool_dir, files)
    rd.record_analysis(db, config.storage.state_dir, study_uid, [rd.analysed(files)])
    assert Reporter(db, config).run_once() == 1
    for path in (config.storage.state_dir / "outbox").rglob("*.dcm"):
        assert dciodvfy_errors(path) == [], path
    return study_uid


def rows(db: Database) -> dict[str, OutboxItem]:
    with db.session() as s:
        return {r.object_kind: r for r in s.scalars(select(OutboxItem).order_by(OutboxItem.id))}


def cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "-c", str(config_path), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def proposed_classes(storescp_log: str) -> list[list[str]]:
    """The abstract syntaxes proposed in each association, from storescp's debug log."""
    associations: list[list[str]] = []
    lines = storescp_log.splitlines()
    for i, line in enumerate(lines):
        if "Association Received" in line:
            associations.append([])
        if line.endswith("(Proposed)") and "Context ID" in line:
            associations[-1].append(lines[i + 1].split("=", 1)[1].strip())
    # The readiness probe's bare TCP connections are logged as associations too.
    return [a for a in associations if a]


def test_delivered_once_with_exactly_the_contexts_needed(tmp_path: Path, storescp_factory) -> None:
    port = free_port()
    pacs = storescp_factory(port).start()
    config = make_config(tmp_path, port)
    db = Database(config.database_url)
    reported_study(tmp_path, config, db)
    queued = rows(db)

    summary = Dispatcher(db, config).run_once()

    assert summary.done == 2 and summary.failed == 0
    done = rows(db)
    for kind in ("sr", "seg"):
        assert done[kind].state == DeliveryState.DONE
        assert (done[kind].attempts, done[kind].last_status) == (1, 0)
        assert done[kind].delivered_at is not None
    assert pacs.received_uids() == sorted(r.sop_instance_uid for r in queued.values())
    # Byte for byte what we built: the dataset is streamed, not re-encoded.
    for kind, prefix in (("sr", "SR"), ("seg", "SG")):
        (received,) = [p for p in pacs.files() if p.name.startswith(prefix)]
        ours = dcmread(config.storage.state_dir / queued[kind].path)
        assert dcmread(received) == ours
    # One association, proposing exactly the two classes sent.
    assert proposed_classes(pacs.log()) == [["SegmentationStorage", "Comprehensive3DSRStorage"]]

    # Done is final: later ticks send nothing.
    for _ in range(3):
        assert Dispatcher(db, config).run_once().done == 0
    assert len(proposed_classes(pacs.log())) == 1
    assert len(pacs.files()) == 2
    with db.session() as s:
        assert len(audit.events(s, EventType.DELIVERY_DONE)) == 2
    db.dispose()


def test_unreachable_pacs_backs_off_dead_letters_and_retry_requeues(
    tmp_path: Path, storescp_factory, caplog: pytest.LogCaptureFixture, db_url: str
) -> None:
    port = free_port()  # nothing listens here yet
    config = make_config(tmp_path, port, db_url=db_url)
    db = Database(config.database_url)
    reported_study(tmp_path, config, db)
    dispatcher = Dispatcher(db, config)
    policy = RetryPolicy(0.2, 0.4, 1.5)

    delays: list[float] = []
    deadline = time.monotonic() + 20
    while any(r.state == DeliveryState.PENDING for r in rows(db).values()):
        assert time.monotonic() < deadline, "never dead-lettered"
        before = utcnow()
        summary = dispatcher.run_once()
        if summary.failed:
            sr = rows(db)["sr"]
            if sr.state == DeliveryState.PENDING:
                delays.append((sr.next_attempt_at - before).total_seconds())
                assert sr.last_error and "AssociationFailed" in sr.last_error
                # Not due before its backoff has passed: a tick before then sends nothing
                # (asked only while it is still before: a loaded machine may be slower).
                if utcnow() < sr.next_attempt_at - timedelta(seconds=0.05):
                    early = dispatcher.run_once()
                    assert early.failed == 0 or utcnow() >= sr.next_attempt_at
        time.sleep(0.05)

    # Exponential backoff, capped: 0.2, 0.4, 0.4, ... (+ the time of the tick itself).
    assert len(delays) >= 2
    for n, delay in enumerate(delays, start=1):
        assert policy.delay(n) <= delay < policy.delay(n) + 0.3
    dead = rows(db)
    assert {r.state for r in dead.values()} == {DeliveryState.DEAD}
    assert all(r.attempts == len(delays) + 1 for r in dead.values())
    # Connection refused: pynetdicom reports an abort; we say what really happened.
    expected = (f"AssociationFailed: association to PACS@127.0.0.1:{port} refused the "
                "connection: nothing listens there (is the PACS up, is the port right?)")
    assert {r.last_error for r in dead.values()} == {expected}
    assert {r.last_status for r in dead.values()} == {None}
    warnings = [
        r for r in caplog.records if r.levelname == "WARNING" and "dead letter" in r.message
    ]
    assert len(warnings) == 2 and "deliveries retry" in warnings[0].message

    cfg = tmp_path / "secondreader.toml"
    status = json.loads(cli(cfg, "status", "--json").stdout)
    assert status["dead_letters"] == 2
    assert {k: n for k, n in status["outbox"].items() if n} == {"dead": 2}
    assert "dead letters: 2" in cli(cfg, "status").stdout
    listing = cli(cfg, "deliveries", "list", "--state", "dead").stdout
    assert listing.count("dead") >= 2 and "last error: AssociationFailed" in listing

    # The PACS is back; an administrator re-queues the dead letters.
    pacs = storescp_factory(port).start()
    assert "re-queued 2 dead letter(s)" in cli(cfg, "deliveries", "retry").stdout
    requeued = rows(db)
    assert {(r.state, r.attempts) for r in requeued.values()} == {(DeliveryState.PENDING, 0)}
    assert dispatcher.run_once().done == 2
    assert {r.state for r in rows(db).values()} == {DeliveryState.DONE}
    assert len(pacs.files()) == 2
    with db.session() as s:
        assert len(audit.events(s, EventType.DELIVERY_REQUEUED)) == 2
        assert len(audit.events(s, EventType.DELIVERY_DEAD)) == 2
    db.dispose()


def test_pacs_refusing_sr_dead_letters_only_the_sr_with_its_reason(
    tmp_path: Path, storescp_factory
) -> None:
    port = free_port()
    refusing = storescp_factory(port, refuse_sr=True).start()
    config = make_config(tmp_path, port)
    db = Database(config.database_url)
    reported_study(tmp_path, config, db)
    dispatcher = Dispatcher(db, config)

    first = dispatcher.run_once()
    assert (first.done, first.failed) == (1, 1)
    after = rows(db)
    assert after["seg"].state == DeliveryState.DONE  # the SEG is not held back by the SR
    assert after["sr"].state == DeliveryState.PENDING and after["sr"].attempts == 1
    assert "refused the SOP class" in (after["sr"].last_error or "")
    # storescp itself says it refused the SR context.
    assert "Comprehensive3DSRStorage" in refusing.log()
    assert "Rejected" in refusing.log() or "abstract syntax not supported" in refusing.log()

    deadline = time.monotonic() + 15
    while rows(db)["sr"].state != DeliveryState.DEAD:
        assert time.monotonic() < deadline
        dispatcher.run_once()
        time.sleep(0.1)
    cfg = tmp_path / "secondreader.toml"
    (item,) = json.loads(cli(cfg, "deliveries", "list", "--state", "dead", "--json").stdout)
    assert item["object_kind"] == "sr" and item["attempts"] >= 2
    # With the SR alone in the association the peer accepts no context at all,
    # and pynetdicom aborts it: the last error still names the refused class.
    assert item["last_error"].startswith("AssociationFailed: association to PACS@")
    assert "refused every presentation context (Comprehensive 3D SR Storage)" in item["last_error"]
    with db.session() as s:
        reasons = [e.detail["error"] for e in audit.events(s, EventType.DELIVERY_ATTEMPT_FAILED)]
        (dead_event,) = audit.events(s, EventType.DELIVERY_DEAD)
    assert "refused the SOP class" in reasons[0]
    assert dead_event.sop_instance_uid == item["sop_instance_uid"]
    assert json.loads(cli(cfg, "status", "--json").stdout)["dead_letters"] == 1

    # The PACS now accepts SR: re-queue by id, and it goes through.
    refusing.stop()
    accepting = storescp_factory(port).start()
    out = cli(cfg, "deliveries", "retry", "--id", str(item["id"])).stdout
    assert "re-queued 1 dead letter(s)" in out
    assert dispatcher.run_once().done == 1
    assert {r.state for r in rows(db).values()} == {DeliveryState.DONE}
    assert accepting.received_uids() == [rows(db)["sr"].sop_instance_uid]
    db.dispose()


def test_commitment_unsupported_means_not_delivered(tmp_path: Path, storescp_factory) -> None:
    port = free_port()
    pacs = storescp_factory(port).start()
    config = make_config(tmp_path, port)
    path = tmp_path / "secondreader.toml"
    path.write_text(
        path.read_text().replace(
            "timeout_seconds = 5", "timeout_seconds = 5\nstorage_commitment = true"
        )
    )
    config = load_config(path, environ={})
    db = Database(config.database_url)
    reported_study(tmp_path, config, db)

    summary = Dispatcher(db, config).run_once()

    # Stored, but storescp has no Storage Commitment: not counted as delivered.
    assert len(pacs.files()) == 2
    assert summary.done == 0 and summary.failed == 2
    for r in rows(db).values():
        assert r.state == DeliveryState.PENDING
        assert r.commitment_state == "failed" and r.attempts == 1
        assert "does not accept Storage Commitment" in (r.last_error or "")
        assert r.next_attempt_at > utcnow() - timedelta(seconds=1)
    db.dispose()


def _openssl(*args: str) -> None:
    subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True)


def _pki(folder: Path) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, by openssl."""
    folder.mkdir()
    p = {n: folder / n for n in ("ca.key", "ca.pem", "srv.key", "srv.pem", "cli.key", "cli.pem")}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", str(p["ca.key"]), "-out", str(p["ca.pem"]),
        "-days", "2", "-subj", "/CN=test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    for name, ext in (
        ("srv", "subjectAltName=IP:127.0.0.1"),
        ("cli", "extendedKeyUsage=clientAuth"),
    ):
        csr, extfile = folder / f"{name}.csr", folder / f"{name}.ext"
        extfile.write_text(ext + "\n")
        _openssl(
            "req", "-new", *ec, "-keyout", str(p[f"{name}.key"]), "-out", str(csr),
            "-subj", f"/CN={name}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(p["ca.pem"]), "-CAkey", str(p["ca.key"]),
            "-CAcreateserial", "-out", str(p[f"{name}.pem"]), "-days", "2",
            "-extfile", str(extfile),
        )  # fmt: skip
    return p


def test_delivery_over_mutual_tls(tmp_path: Path, storescp_factory) -> None:
    pki = _pki(tmp_path / "pki")
    port = free_port()
    pacs = storescp_factory(port)
    # storescp requires and verifies our client certificate (its default, -rc).
    pacs.extra = ["+tls", str(pki["srv.key"]), str(pki["srv.pem"]), "+cf", str(pki["ca.pem"])]
    pacs.start()
    config = make_config(tmp_path, port)
    path = tmp_path / "secondreader.toml"
    path.write_text(
        path.read_text()
        + f"""
[delivery.destinations.tls]
enabled = true
ca_file = "{pki["ca.pem"]}"
cert_file = "{pki["cli.pem"]}"
key_file = "{pki["cli.key"]}"
"""
    )
    config = load_config(path, environ={})
    assert config.delivery.destinations[0].tls.enabled
    db = Database(config.database_url)
    reported_study(tmp_path, config, db)

    assert Dispatcher(db, config).run_once().done == 2
    assert len(pacs.files()) == 2
    # storescp saw our client certificate on a TLS connection.
    assert "Transport connection: TLS over TCP/IP" in pacs.log()
    assert "Subject     : /CN=cli" in pacs.log()
    db.dispose()
