"""The DICOM SCU side: C-ECHO and C-STORE to a remote AE.

Files are streamed as they are on disk (no decode, no re-encode), over one
association, with exactly the presentation contexts the files need.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from dicom_io.status import COERCION_OF_DATA_ELEMENTS, STORAGE_WARNING_LAST, SUCCESS

log = logging.getLogger(__name__)

# Stream datasets from disk instead of decoding them (see shared notes).
_config.STORE_SEND_CHUNKED_DATASET = True

_MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255


class AssociationFailed(ConnectionError):
    """The remote AE could not be reached, or rejected or aborted the association."""


@dataclass(frozen=True)
class RemoteAE:
    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "SECONDREADER"
    ssl_context: ssl.SSLContext | None = None
    # Hostname to check against the server certificate (TLS only).
    tls_server_name: str | None = None
    timeout: float = 30.0


@dataclass(frozen=True)
class SendResult:
    path: Path
    sop_instance_uid: str
    status: int | None  # None: not stored and no response; `error` says why
    error: str | None = None

    @property
    def ok(self) -> bool:
        # B000-B007 are warnings: stored, with coercion. Still stored.
        return self.status is not None and (
            self.status == SUCCESS
            or COERCION_OF_DATA_ELEMENTS <= self.status <= STORAGE_WARNING_LAST
        )


def associate(ae: AE, remote: RemoteAE) -> Association:
    tls = None
    if remote.ssl_context is not None:
        tls = (remote.ssl_context, remote.tls_server_name or remote.host)
    assoc = ae.associate(remote.host, remote.port, ae_title=remote.ae_title, tls_args=tls)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        if assoc.is_aborted:
            why = _unreachable(remote) or "aborted by the peer"
        refused = sorted({_class_name(cx.abstract_syntax) for cx in assoc.rejected_contexts})
        if refused and not assoc.accepted_contexts:
            # pynetdicom aborts when the peer accepts no context: say which were refused.
            why = f"refused every presentation context ({', '.join(refused)})"
        raise AssociationFailed(
            f"association to {remote.ae_title}@{remote.host}:{remote.port} {why}"
        )
    return assoc


def _unreachable(remote: RemoteAE) -> str | None:
    """Why no association could even start, or None when the port answers TCP.

    pynetdicom reports a refused or unanswered connection as an abort; an
    administrator needs to know the PACS never heard us.
    """
    try:
        with socket.create_connection((remote.host, remote.port), timeout=min(remote.timeout, 5)):
            return None
    except ConnectionRefusedError:
        return "refused the connection: nothing listens there (is the PACS up, is the port right?)"
    except TimeoutError:
        return "did not answer the connection (wrong host, or a firewall?)"
    except OSError as exc:
        return f"could not be reached ({exc.strerror or type(exc).__name__})"


def _class_name(uid: str | None) -> str:
    return UID(uid).name if uid else "?"


def new_ae(remote: RemoteAE) -> AE:
    ae = AE(ae_title=remote.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = remote.timeout
    ae.maximum_pdu_size = 0
    return ae


def echo(remote: RemoteAE) -> int:
    """C-ECHO; returns the status (0 is success)."""
    ae = new_ae(remote)
    ae.add_requested_context(Verification)
    assoc = associate(ae, remote)
    try:
        rsp = assoc.send_c_echo()
        if not rsp:
            raise AssociationFailed("no C-ECHO response")
        return int(rsp.Status)
    finally:
        assoc.release()


def _header(path: Path) -> tuple[str, str, str]:
    ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID)


def expand(paths: Iterable[Path]) -> list[Path]:
    """Files as given, folders walked recursively (hidden files skipped)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(
                f for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith(".")
            )
        else:
            out.append(p)
    return out


def send(paths: Sequence[Path], remote: RemoteAE) -> list[SendResult]:
    """C-STORE each file over one association; returns a result per file.

    Files that are not DICOM are reported with status None and not sent.
    """
    items: list[tuple[Path, str, str, str]] = []
    results: list[SendResult] = []
    for path in paths:
        try:
            items.append((path, *_header(path)))
        except Exception as exc:
            log.warning("not sending %s: not a readable DICOM file (%s)", path, exc)
            results.append(SendResult(path, "", None, "not a readable DICOM file"))
    pairs = sorted({(cls, ts) for _, cls, _, ts in items})
    if len(pairs) > _MAX_CONTEXTS:
        raise ValueError(
            f"{len(pairs)} SOP class/transfer syntax pairs; at most 128 per association"
        )
    ae = new_ae(remote)
    for cls, ts in pairs:
        # Exactly the file's own syntax: chunked sending streams the bytes as
        # they are, so the peer must accept that syntax or refuse the class.
        ae.add_requested_context(cls, [ts])
    if not items:
        return results
    assoc = associate(ae, remote)
    try:
        for path, _cls, sop_uid, _ts in items:
            if not assoc.is_established:
                results.append(SendResult(path, sop_uid, None, "association lost"))
                continue
            try:
                rsp = assoc.send_c_store(path)
            except ValueError as exc:
                # The peer refused this file's SOP class or transfer syntax
                # (presentation context rejected): report it, send the rest.
                log.warning("not sending %s: %s", path, exc)
                why = f"the peer refused the SOP class {_class_name(_cls)} ({_class_name(_ts)})"
                results.append(SendResult(path, sop_uid, None, why))
                continue
            status = int(rsp.Status) if rsp and "Status" in rsp else None
            error = None if status is not None else "no C-STORE response (association lost)"
            results.append(SendResult(path, sop_uid, status, error))
    finally:
        if assoc.is_established:
            assoc.release()
    return results
