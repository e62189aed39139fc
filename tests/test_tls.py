"""DICOM TLS with client certificates: our CLI and dcmtk's storescu against a TLS daemon.

Certificates come from the `openssl` command (the `cryptography` package is not
a dependency): a test CA, a server certificate for 127.0.0.1, a client
certificate from that CA, and one from a CA the daemon does not trust.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from db.audit import EventType
from db.models import AuditEvent
from tests.attacks import closed_by_peer, connect
from tests.conftest import DaemonProcess, require_tool, storescu
from tests.dicomgen import (
    RECEIVE_ONLY,
    DaemonDB,
    ct_study,
    dataset_bytes,
    header,
    part_files,
    spool_path,
)


def _openssl(*args: str) -> None:
    subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True)


def _key_and_csr(folder: Path, name: str, cn: str) -> tuple[Path, Path]:
    key, csr = folder / f"{name}.key", folder / f"{name}.csr"
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}",
    )  # fmt: skip
    return key, csr


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, pem = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(pem), "-days", "2",
        "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return key, pem


def _issue(folder: Path, name: str, cn: str, ca: tuple[Path, Path], ext: str) -> Path:
    key, csr = _key_and_csr(folder, name, cn)
    extfile = folder / f"{name}.ext"
    extfile.write_text(ext)
    pem = folder / f"{name}.pem"
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
        "-CAcreateserial", "-out", str(pem), "-days", "2", "-extfile", str(extfile),
    )  # fmt: skip
    return pem


@dataclass(frozen=True)
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca = _ca(d, "test-ca")
    rogue_ca = _ca(d, "rogue-ca")
    server = _issue(
        d,
        "server",
        "localhost",
        ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    client = _issue(d, "client", "MODALITY", ca, "extendedKeyUsage=clientAuth\n")
    rogue = _issue(d, "rogue", "MODALITY", rogue_ca, "extendedKeyUsage=clientAuth\n")
    return PKI(
        ca=ca[1],
        server_cert=server,
        server_key=d / "server.key",
        client_cert=client,
        client_key=d / "client.key",
        rogue_cert=rogue,
        rogue_key=d / "rogue.key",
    )


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[DaemonProcess]:
    d = DaemonProcess(
        tmp_path_factory.mktemp("tls"),
        RECEIVE_ONLY
        + f"""
[scp.tls]
enabled = true
cert_file = "{pki.server_cert}"
key_file = "{pki.server_key}"
ca_file = "{pki.ca}"
""",
        env={"SECONDREADER_SCP__REQUEST_TIMEOUT_SECONDS": "2"},
    )
    d.start()
    yield d
    if d.proc is not None:
        d.kill()


def _echo(d: DaemonProcess, *tls: str) -> tuple[int, str]:
    r = d.cli("echo", "--port", str(d.port), "--aet", "SECONDREADER", *tls, check=False)
    return r.returncode, r.stdout + r.stderr


def test_echo_with_client_certificate(tls_daemon: DaemonProcess, pki: PKI) -> None:
    rc, out = _echo(
        tls_daemon,
        "--tls",
        "--tls-ca", str(pki.ca),
        "--tls-cert", str(pki.client_cert),
        "--tls-key", str(pki.client_key),
    )  # fmt: skip
    assert rc == 0, out
    assert "C-ECHO status 0x0000" in out
    assert "(tls=True)" in tls_daemon.log()


def test_refused_without_a_trusted_client_certificate(tls_daemon: DaemonProcess, pki: PKI) -> None:
    db = DaemonDB.of(tls_daemon.state)
    before = len(db.events(EventType.ASSOCIATION_ACCEPTED))
    rc, out = _echo(tls_daemon, "--tls", "--tls-ca", str(pki.ca))
    assert rc == 1 and "echo failed" in out
    rc, out = _echo(
        tls_daemon,
        "--tls",
        "--tls-ca", str(pki.ca),
        "--tls-cert", str(pki.rogue_cert),
        "--tls-key", str(pki.rogue_key),
    )  # fmt: skip
    assert rc == 1 and "echo failed" in out
    # Plain DICOM to the TLS port: no association either.
    rc, out = _echo(tls_daemon)
    assert rc == 1 and "echo failed" in out
    assert len(db.events(EventType.ASSOCIATION_ACCEPTED)) == before
    db.close()
    assert tls_daemon.proc is not None and tls_daemon.proc.poll() is None


def test_dcmtk_storescu_over_tls(tls_daemon: DaemonProcess, pki: PKI, tmp_path: Path) -> None:
    files = ct_study(tmp_path / "ct", 3, seed=21)
    mutual = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    r = storescu(tls_daemon.port, files, extra=mutual)
    assert r.returncode == 0, r.stderr
    for path in files:
        assert dataset_bytes(spool_path(tls_daemon.state, header(path))) == dataset_bytes(path)

    # Anonymous TLS (no client certificate) and plain TCP are both turned away.
    others = ct_study(tmp_path / "other", 1, seed=22)
    anonymous = storescu(tls_daemon.port, others, extra=["+tla", "+cf", str(pki.ca)])
    plain = storescu(tls_daemon.port, others)
    for r in (anonymous, plain):
        assert r.returncode != 0
        assert "Association Request Failed" in r.stderr
    assert not spool_path(tls_daemon.state, header(others[0])).exists()
    assert part_files(tls_daemon.state) == []


def test_a_silent_tcp_peer_does_not_block_tls_associations(
    tls_daemon: DaemonProcess, pki: PKI
) -> None:
    """The handshake ran in the accept thread: one idle connection blocked every TLS peer."""
    db = DaemonDB.of(tls_daemon.state)
    mark = max((e.id for e in db.events()), default=0)
    with connect(tls_daemon.port, "127.0.0.80") as silent:
        rc, out = _echo(
            tls_daemon,
            "--tls",
            "--tls-ca", str(pki.ca),
            "--tls-cert", str(pki.client_cert),
            "--tls-key", str(pki.client_key),
        )  # fmt: skip
        assert rc == 0, out
        # The silent one is cut at the request deadline (2 s here).
        assert closed_by_peer(silent, 20)

    def cut() -> list[AuditEvent]:
        return [
            e
            for e in db.events(EventType.ASSOCIATION_ABORTED)
            if e.id > mark and e.detail["address"] == "127.0.0.80"
        ]

    events = tls_daemon.wait_for(cut, timeout=20)
    assert "no association admitted within 2 s" in events[0].detail["reason"]
    db.close()
