"""TLS contexts for DICOM TLS (PS3.15 Annex B): server side and client side."""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(cert_file: Path, key_file: Path, ca_file: Path | None = None) -> ssl.SSLContext:
    """Server certificate; with `ca_file`, client certificates are required and verified."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    return ctx
