"""Raw-socket peers that misbehave: the attackers of tests/test_hostile.py.

Every one of them talks to loopback only, sends a bounded number of bytes
and stops by itself.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification


def associate_rq(
    calling: str = "ATTACKER", called: str = "SECONDREADER", storage: bool = False
) -> bytes:
    """A valid A-ASSOCIATE-RQ PDU proposing Verification (and CT storage)."""
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    contexts = [build_context(Verification)]
    if storage:
        contexts.append(build_context(CTImageStorage, ["1.2.840.10008.1.2.1"]))
    for i, cx in enumerate(contexts):
        cx.context_id = 2 * i + 1
    prim.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = 16382
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    prim.user_information = [length, impl]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def with_raw_calling_ae(pdu: bytes, raw: bytes) -> bytes:
    """The request with the calling AE title field (bytes 26-41) replaced, unchecked."""
    field = raw.ljust(16, b" ")[:16]
    return pdu[:26] + field + pdu[42:]


def connect(port: int, source: str = "127.0.0.1", timeout: float = 30) -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the other side closes (EOF or reset) within `timeout`; reads what it sends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def read_pdu(sock: socket.socket, timeout: float = 30) -> tuple[int, bytes]:
    """(type, body) of the next PDU the SCP sends."""
    sock.settimeout(timeout)
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            raise ConnectionError("closed before a PDU")
        header += chunk
    pdu_type, _, length = struct.unpack(">BBL", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed inside a PDU")
        body += chunk
    return pdu_type, body


def established(port: int, source: str = "127.0.0.1", calling: str = "ATTACKER") -> socket.socket:
    """A raw socket whose association the SCP accepted (A-ASSOCIATE-AC read)."""
    sock = connect(port, source)
    sock.sendall(associate_rq(calling=calling, storage=True))
    pdu_type, _ = read_pdu(sock)
    if pdu_type != 0x02:
        sock.close()
        raise ConnectionError(f"association not accepted (PDU type 0x{pdu_type:02X})")
    return sock


@contextmanager
def sockets(n: int) -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    try:
        yield held
    finally:
        for s in held:
            s.close()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _pdv(context_id: int, data: bytes, command: bool) -> bytes:
    """One P-DATA-TF PDU holding one whole fragment (PS3.8 9.3.5, E.2)."""
    header = 0x03 if command else 0x02  # last fragment, command or dataset
    item = struct.pack(">LBB", len(data) + 2, context_id, header) + data
    return struct.pack(">BBL", 0x04, 0, len(item)) + item


def c_store_rq(
    sop_instance_uid: str,
    dataset: bytes,
    context_id: int = 3,
    sop_class_uid: str = CTImageStorage,
    message_id: int = 7,
) -> bytes:
    """A C-STORE-RQ as P-DATA PDUs, its UIDs as given: unchecked, like a broken sender's."""
    cs = Dataset()
    cs.AffectedSOPClassUID = sop_class_uid
    cs.CommandField = 0x0001
    cs.MessageID = message_id
    cs.Priority = 0
    cs.CommandDataSetType = 0x0000
    cs.AffectedSOPInstanceUID = sop_instance_uid
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, cs)
    elements = body.getvalue()
    group_length = struct.pack("<HHLL", 0x0000, 0x0000, 4, len(elements))
    return _pdv(context_id, group_length + elements, True) + _pdv(context_id, dataset, False)


def garbage_command(context_id: int = 1, size: int = 64) -> bytes:
    """A P-DATA PDU whose command fragment is random bytes."""
    return _pdv(context_id, os.urandom(size), True)


def dimse_status(sock: socket.socket, timeout: float = 10) -> int | None:
    """The Status of the next DIMSE response; None if the SCP aborts or closes instead."""
    try:
        pdu_type, body = read_pdu(sock, timeout)
    except (ConnectionError, OSError):
        return None
    if pdu_type != 0x04:
        return None
    # One PDV item: length (4), context (1), header (1), then the command set.
    fragment = body[6:]
    ds = read_dataset(DicomBytesIO(fragment), True, True)
    return int(ds.Status)
