"""Test data for the receive tests: generated studies, real sample images, bad files.

Also the two byte-level tools the receive tests need: splitting a Part 10 file
into its preamble + file meta and its dataset (the spool file carries our meta,
storescu sends only the dataset), and streaming a file's raw bytes with
pynetdicom, for inputs that dcmtk refuses to read before sending.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid

from db.audit import events
from db.models import AuditEvent, Instance, Job, Series, Study
from db.session import Database
from db.studies import get_study, study_instances
from dicom_io.synthetic import write_ct_series
from model.phantom import phantom_volume
from tests.conftest import dcmtk_env, free_port, require_tool, storescu

PATIENT_NAME = "Test^Phantom"
PATIENT_ID = "SR-TEST-0001"

# Real images from pydicom and pydicom-data, one per SOP Instance UID (many of
# pydicom's files are one instance in several transfer syntaxes). All are image
# storage classes; together they cover the uncompressed, compressed and
# multi-frame encodings a modality sends.
REAL_IMAGES: tuple[str, ...] = (
    "RG1_UNCI.dcm",  # CR chest 1955x1841, explicit VR little endian, 7 MB
    "693_UNCI.dcm",  # CT 512x512, explicit VR little endian
    "693_J2KR.dcm",  # CT 512x512, JPEG 2000 lossless
    "MR2_UNCI.dcm",  # MR 1024x1024
    "eCT_Supplemental.dcm",  # Enhanced CT, 2 frames
    "emri_small.dcm",  # Enhanced MR, 10 frames
    "MR_small_jpeg_ls_lossless.dcm",  # MR, JPEG-LS lossless
    "OBXXXX1A_rle.dcm",  # US, RLE lossless
    "SC_rgb_small_odd_big_endian.dcm",  # explicit VR big endian (retired), odd size
    "JPEG-LL.dcm",  # JPEG lossless, process 14 SV1
    "JPGExtended.dcm",  # JPEG extended, 12 bit
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, RGB
    "US1_J2KR.dcm",  # US, JPEG 2000 lossless
    "image_dfl.dcm",  # deflated explicit VR little endian
    "CT_small.dcm",  # CT 128x128, explicit VR little endian
)

NON_IMAGE = "reportsi.dcm"  # Basic Text SR: refused at negotiation


def sample_file(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"{name}: not in pydicom's or pydicom-data's test files")
    return Path(str(path))


def real_images() -> list[Path]:
    return [sample_file(name) for name in REAL_IMAGES]


# -- Part 10 framing ----------------------------------------------------------

# VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())


def split_part10(data: bytes) -> tuple[bytes, bytes]:
    """(preamble + 'DICM' + file meta group, dataset) of a Part 10 file's bytes.

    The file meta is always explicit VR little endian (PS3.10 7.1); it ends at
    the first element outside group 0002.
    """
    if data[128:132] != b"DICM":
        raise ValueError("no DICM prefix at byte 128: not a Part 10 file")
    pos = 132
    while pos + 8 <= len(data):
        group, _element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8 + length
    return data[:pos], data[pos:]


def dataset_bytes(path: Path) -> bytes:
    """The dataset of a Part 10 file, exactly as encoded, without preamble and meta."""
    return split_part10(path.read_bytes())[1]


@dataclass(frozen=True)
class Header:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_name: str
    patient_id: str


def header(path: Path) -> Header:
    ds = dcmread(path, stop_before_pixels=True)
    return Header(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        patient_name=str(ds.get("PatientName", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""),
    )


# -- generated studies --------------------------------------------------------


# A chest CT's reconstruction diameter: inside what the built-in CT model was made for.
CT_FIELD_OF_VIEW_MM = 358.4


def ct_study(
    out_dir: Path,
    n_slices: int,
    *,
    size: int = 128,
    seed: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> list[Path]:
    """A chest CT series of `n_slices` slices of `size`x`size`, no nodule (model/phantom.py).

    A phantom, not plain noise: the built-in CT model analyses only series
    like those it was made for (model/expectations.py: field of view,
    intensities, noise), and the pipeline tests need it to run. Noisy and
    different in every slice, so a swapped or stale slice shows in a byte compare.
    """
    spacing = (2.5, CT_FIELD_OF_VIEW_MM / size, CT_FIELD_OF_VIEW_MM / size)
    volume, _ = phantom_volume(seed, n_slices=n_slices, rows=size, cols=size, spacing=spacing)
    return write_ct_series(
        volume,
        out_dir,
        spacing=spacing,
        study_uid=study_uid or generate_uid(),
        series_uid=series_uid,
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
        seed=seed,
    )


# -- bad inputs ----------------------------------------------------------------


def truncated_copy(src: Path, dst: Path, cut_bytes: int = 1000) -> Path:
    """`src` with its last `cut_bytes` bytes missing: the meta intact, the dataset cut."""
    data = src.read_bytes()
    dst.write_bytes(data[:-cut_bytes])
    return dst


def garbage_after_meta(src: Path, dst: Path, n: int = 4096) -> Path:
    """A valid preamble and file meta (from `src`) followed by random bytes."""
    meta, _ = split_part10(src.read_bytes())
    rng = np.random.default_rng(7)
    dst.write_bytes(meta + rng.integers(0, 256, size=n, dtype=np.uint8).tobytes())
    return dst


def without_sop_instance_uid(src: Path, dst: Path) -> Path:
    """`src` re-written without (0008,0018); the file meta still names the instance."""
    ds = dcmread(src)
    del ds.SOPInstanceUID
    ds.save_as(dst, enforce_file_format=False)
    return dst


def not_dicom(dst: Path) -> Path:
    dst.write_bytes(b"This is a plain text file, not DICOM.\n" * 100)
    return dst


def copy_as(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


# -- raw streaming SCU ------------------------------------------------------------


def raw_send(
    port: int,
    paths: Sequence[Path],
    *,
    calling_aet: str = "RAWSCU",
    called_aet: str = "SECONDREADER",
) -> list[int | None]:
    """C-STORE each file's bytes as they are on disk (nothing decoded) over one association.

    The request's UIDs and the transfer syntax come from the file meta only,
    so a damaged dataset reaches the peer unchanged. Returns one status per
    file, None where no response came.
    """
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    metas = [read_file_meta_info(p) for p in paths]
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for pair in sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}):
        ae.add_requested_context(pair[0], [pair[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    if not assoc.is_established:
        raise ConnectionError(f"association to port {port} not established")
    statuses: list[int | None] = []
    try:
        for path in paths:
            rsp = assoc.send_c_store(path)
            statuses.append(int(rsp.Status) if rsp and "Status" in rsp else None)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


# storescu proposes only the transfer syntaxes one -x option names; a file in
# another syntax gets converted (or, for a compressed one, fails to send).
STORESCU_TS_FLAG: dict[str, str] = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
}


def by_transfer_syntax(paths: Sequence[Path]) -> dict[str, list[Path]]:
    """Files grouped by their transfer syntax, to send each group with its -x option."""
    groups: dict[str, list[Path]] = {}
    for p in paths:
        groups.setdefault(str(read_file_meta_info(p).TransferSyntaxUID), []).append(p)
    return groups


def send_by_transfer_syntax(
    port: int, paths: Sequence[Path], *, aet: str = "STORESCU", aec: str = "SECONDREADER"
) -> list[subprocess.CompletedProcess[str]]:
    """storescu each transfer syntax group over its own association, sent as it is."""
    return [
        storescu(port, group, aet=aet, aec=aec, extra=["-R", STORESCU_TS_FLAG[ts]])
        for ts, group in by_transfer_syntax(paths).items()
    ]


# -- dcmtk's storescp as the reference receiver -----------------------------------


@contextmanager
def storescp(out_dir: Path, *, aet: str = "STORESCP") -> Iterator[int]:
    """dcmtk's storescp on a free port, writing what it receives bit for bit (+B).

    +xa accepts every transfer syntax it knows, compressed ones included, so a
    compressed file is stored as sent rather than refused.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [require_tool("storescp"), "-aet", aet, "+xa", "+B", "-od", str(out_dir), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dcmtk_env(),
    )
    try:
        _wait_listening(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"storescp exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"storescp not listening on {port} after {timeout} s")


def by_sop_instance(folder: Path) -> dict[str, Path]:
    """Part 10 files under `folder` by their Media Storage SOP Instance UID."""
    return {
        str(read_file_meta_info(p).MediaStorageSOPInstanceUID): p
        for p in folder.rglob("*")
        if p.is_file()
    }


# -- the daemon's state, read back --------------------------------------------------

# The receive tests stop at the queue: no in-process worker takes the jobs.
RECEIVE_ONLY = "\n[worker]\nin_process = false\n"


def spool_path(state_dir: Path, h: Header) -> Path:
    return (
        state_dir
        / "spool"
        / h.study_instance_uid
        / h.series_instance_uid
        / f"{h.sop_instance_uid}.dcm"
    )


def part_files(state_dir: Path) -> list[Path]:
    return sorted((state_dir / "spool" / ".incoming").glob("*"))


class DaemonDB:
    """Read-only views of a daemon's database, through the db package."""

    def __init__(self, url: str) -> None:
        self.db = Database(url)

    @classmethod
    def of(cls, state_dir: Path) -> DaemonDB:
        """The embedded SQLite database of a daemon whose state folder is `state_dir`."""
        return cls(f"sqlite:///{state_dir / 'secondreader.db'}")

    def close(self) -> None:
        self.db.dispose()

    def study(self, uid: str) -> Study | None:
        with self.db.session() as s:
            return get_study(s, uid)

    def instances(self, study_uid: str) -> list[Instance]:
        with self.db.session() as s:
            return study_instances(s, study_uid)

    def series(self, study_uid: str) -> list[Series]:
        from sqlalchemy import select

        with self.db.session() as s:
            return list(
                s.scalars(
                    select(Series)
                    .join(Study)
                    .where(Study.study_instance_uid == study_uid)
                    .order_by(Series.id)
                )
            )

    def jobs(self, study_uid: str) -> list[Job]:
        from sqlalchemy import select

        with self.db.session() as s:
            return list(
                s.scalars(
                    select(Job)
                    .join(Study, Job.study_id == Study.id)
                    .where(Study.study_instance_uid == study_uid)
                    .order_by(Job.id)
                )
            )

    def events(self, event_type: str | None = None) -> list[AuditEvent]:
        with self.db.session() as s:
            return events(s, event_type)

    def complete(self, *study_uids: str) -> bool:
        states = [self.study(uid) for uid in study_uids]
        return all(st is not None and st.state == "complete" for st in states)


def daemon_db(state_dir: Path) -> Iterator[DaemonDB]:
    """A module fixture's body: the daemon's database, closed after the module."""
    db = DaemonDB.of(state_dir)
    yield db
    db.close()


# -- no PHI in logs ------------------------------------------------------------------


def phi_values(headers: Sequence[Header]) -> set[str]:
    """Patient names and IDs worth looking for (empty and all-caret values carry nothing)."""
    values = {PATIENT_NAME, PATIENT_ID}
    for h in headers:
        for v in (h.patient_name, h.patient_id):
            if v.strip("^ "):
                values.add(v)
    return values


def phi_in(text: str, values: set[str]) -> list[str]:
    """The values found in `text` as whole tokens (a short ID like "ID1" inside a UID is not)."""
    found = []
    for v in sorted(values):
        if re.search(rf"(?<![0-9A-Za-z.]){re.escape(v)}(?![0-9A-Za-z])", text):
            found.append(v)
    return found
