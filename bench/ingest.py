"""Receive throughput: dcmtk's storescu sending one CT study to storescp and to us.

One run, on loopback:

1. writes a CT study (default 200 slices of 512x512, noisy content) to a
   temporary folder;
2. sends it with storescu (TCP_NODELAY=1) over one association, then over four
   concurrent associations (the files split four ways, four storescu started
   together), to
   - dcmtk's storescp (its defaults, plus --fork so that it serves concurrent
     associations at all; it writes files and does not fsync),
   - `secondreader serve` with the default configuration (fsync of every file
     and its folder, SQLite synchronous=NORMAL), only host, port and state folder
     set, and no in-process worker (the models would compete for the CPU),
   - the same with durability off (storage.fsync=false), labelled;
   - the same with 2 receiving processes sharing the port (scp.processes);
   - Debian's Orthanc, a durable PACS (SyncStorageArea, SQLite index);
3. repeats each measurement (default 3) and prints the median in MB/s
   (10^6 bytes of Part 10 files per second of wall time, from starting the
   storescu processes to the last one exiting) and the ratio to storescp.

storescu invents new SOP Instance UIDs for every image it sends (+II), so each
repeat stores new instances rather than re-sending known ones.

Every received file stays until the run ends (some 6 GB in the temporary
folder with the defaults): deleting files slows the creation of new ones on
this machine's disk for minutes after (`create_cost`), which would weigh on the
rows that follow a deletion. The time to create an empty file is printed before
and after; above 100 us, the figures are low and a later run tells more.

    .venv/bin/python bench/ingest.py [--slices 200] [--size 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dicom_io.synthetic import write_ct_series  # noqa: E402

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout} s")


def wait_log(
    log: Path, text: str, count: int, proc: subprocess.Popen[bytes], timeout: float = 60
) -> None:
    """Until `count` lines of `log` name `text` and say "listening"."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log.read_text(errors="replace").splitlines()
        if sum(text in line and "listening" in line for line in lines) >= count:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{count} x {text!r} not in {log} after {timeout} s")


def create_cost(folder: Path, count: int = 200) -> float:
    """Microseconds to create one empty file in `folder`: the filesystem's state, now.

    On ext4 without a journal (this machine's disk) the inode allocator skips
    every inode freed in the last five minutes, scanning from the start of the
    group each time: after thousands of files are deleted, creating a file
    costs 300-1,000 us of kernel time instead of 25 (perf: recently_deleted,
    find_get_block_common). Every receiver here creates a file per object, so
    the figures of such a run are low, and four associations' creations race
    over the same scan. Hence nothing is deleted before the run ends, and the
    cost is printed before and after.
    """
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for k in range(count):
        os.close(os.open(folder / f"{time.time_ns()}-{k}", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    return 1e6 * (time.perf_counter() - start) / count


def report_create_cost(folder: Path, when: str) -> None:
    cost = create_cost(folder)
    note = ""
    if cost > 100:
        note = " (slow: files were deleted here in the last minutes; figures will be low)"
    print(f"file creation {when}: {cost:.0f} us per empty file{note}", flush=True)


def make_study(folder: Path, slices: int, size: int) -> list[Path]:
    rng = np.random.default_rng(2024)
    volume = rng.normal(40.0, 300.0, size=(slices, size, size)).astype(np.float32)
    return write_ct_series(volume, folder, patient_name="Bench^Phantom", patient_id="BENCH-0001")


# -- receivers -------------------------------------------------------------------


@dataclass
class Receiver:
    label: str
    port: int
    aet: str
    count_files: Callable[[], int]


@contextmanager
def storescp(workdir: Path) -> Iterator[Receiver]:
    out = workdir / "storescp-out"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "--fork", "-aet", "STORESCP", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=DCMTK_ENV,
    )
    try:
        wait_port(port, proc)
        yield Receiver("dcmtk storescp", port, "STORESCP", lambda: sum(1 for _ in out.iterdir()))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def secondreader(
    workdir: Path, label: str, overrides: dict[str, str] | None = None
) -> Iterator[Receiver]:
    root = workdir / label.replace(" ", "-").replace(",", "")
    root.mkdir()
    port = free_port()
    config = root / "secondreader.toml"
    config.write_text(
        f'[scp]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[storage]\nstate_dir = "{root / "state"}"\n'
        "[worker]\nin_process = false\n"
    )
    env = {**os.environ, "SECONDREADER_CONFIG": str(config), **(overrides or {})}
    cli = [sys.executable, "-m", "daemon.cli"]
    subprocess.run([*cli, "db", "upgrade"], cwd=REPO, env=env, check=True, capture_output=True)
    log = root / "serve.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [*cli, "serve"], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT
        )
    spool = root / "state" / "spool"
    try:
        wait_port(port, proc)
        # serve answers at once; its other receiving processes start beside it.
        processes = int((overrides or {}).get("SECONDREADER_SCP__PROCESSES", "1"))
        wait_log(log, "receiving process", processes - 1, proc)
        yield Receiver(
            label,
            port,
            "SECONDREADER",
            lambda: sum(1 for p in spool.rglob("*.dcm")),
        )
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@contextmanager
def orthanc(workdir: Path) -> Iterator[Receiver]:
    """Debian's Orthanc as a durable PACS: its default SyncStorageArea (fsync), SQLite index."""
    root = workdir / "orthanc"
    root.mkdir()
    port, http = free_port(), free_port()
    config = root / "orthanc.json"
    config.write_text(
        json.dumps(
            {
                "Name": "bench",
                "StorageDirectory": str(root / "storage"),
                "IndexDirectory": str(root / "storage"),
                "DicomPort": port,
                "HttpPort": http,
                "DicomAet": "ORTHANC",
                "SyncStorageArea": True,
                "Plugins": [],
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
            }
        )
    )
    proc = subprocess.Popen(
        ["Orthanc", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=DCMTK_ENV, cwd=root,
    )  # fmt: skip

    def count() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/statistics", timeout=10) as rsp:
            return int(json.loads(rsp.read())["CountInstances"])

    try:
        wait_port(port, proc)
        yield Receiver("Orthanc (Debian; fsync, SQLite)", port, "ORTHANC", count)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@contextmanager
def bare_pynetdicom(workdir: Path) -> Iterator[Receiver]:
    """Reference: a bare pynetdicom SCP (in this process) writing the raw bytes to a file.

    No validation, no fsync, no database: the ceiling of any receiver built on
    pynetdicom, to tell the library's share of the time from ours.
    """
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
    from pynetdicom.sop_class import CTImageStorage

    out = workdir / "bare-out"
    out.mkdir()

    def on_store(event: evt.Event) -> int:
        name = f"{event.request.AffectedSOPInstanceUID}.dcm"
        (out / name).write_bytes(event.encoded_dataset(include_meta=True))
        return 0x0000

    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 0
    ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield Receiver(
            "reference: bare pynetdicom SCP, no fsync/DB",
            port,
            "BARE",
            lambda: sum(1 for _ in out.iterdir()),
        )
    finally:
        server.shutdown()


# -- senders -----------------------------------------------------------------------


def send(receiver: Receiver, files: Sequence[Path], associations: int) -> float:
    """Seconds for `associations` storescu processes to send `files` between them."""
    before = receiver.count_files()
    groups = [list(files[k::associations]) for k in range(associations)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "+II", "+IR", "100000", "-aec", receiver.aet]
            + ["127.0.0.1", str(receiver.port), *map(str, group)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=DCMTK_ENV,
        )
        for group in groups
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')}")
    elapsed = time.perf_counter() - start
    # Received files land before their response: all must be there now.
    deadline = time.monotonic() + 10
    while receiver.count_files() - before < len(files) and time.monotonic() < deadline:
        time.sleep(0.05)
    got = receiver.count_files() - before
    if got != len(files):
        raise RuntimeError(f"{receiver.label}: {got} files received of {len(files)}")
    return elapsed


def measure(receiver: Receiver, files: Sequence[Path], repeats: int) -> dict[int, float]:
    mb = sum(p.stat().st_size for p in files) / 1e6
    # Not timed: the first send pays for what starts once (imports, compiled
    # statements, connection pools), for every receiver alike.
    send(receiver, files, 4)
    # One and four associations take turns, repeat after repeat: the machine's
    # drift (a shared VM) then weighs on both figures alike, not on one.
    times: dict[int, list[float]] = {1: [], 4: []}
    for _ in range(repeats):
        for n in (1, 4):
            times[n].append(send(receiver, files, n))
    result = {}
    for n in (1, 4):
        result[n] = mb / statistics.median(times[n])
        spread = ", ".join(f"{mb / t:.0f}" for t in times[n])
        print(f"  {receiver.label:<40} {n} assoc: {result[n]:7.1f} MB/s  ({spread})", flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-durability-off", action="store_true", help="skip the fsync-off row")
    parser.add_argument("--no-reference", action="store_true", help="skip the bare pynetdicom row")
    parser.add_argument(
        "--pdu-row",
        type=int,
        action="append",
        default=[],
        metavar="BYTES",
        help="add a row with this scp.max_pdu_size (repeatable)",
    )
    parser.add_argument(
        "--processes-row",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="add a row with scp.processes = N receiving processes (repeatable; default 2 and 4)",
    )
    parser.add_argument("--no-orthanc", action="store_true", help="skip the Orthanc row")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found: install dcmtk")

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        workdir = Path(tmp)
        t = time.perf_counter()
        files = make_study(workdir / "study", args.slices, args.size)
        mb = sum(p.stat().st_size for p in files) / 1e6
        print(
            f"study: {len(files)} CT slices of {args.size}x{args.size}, {mb:.1f} MB "
            f"(written in {time.perf_counter() - t:.1f} s); median of {args.repeats}",
            flush=True,
        )
        report_create_cost(workdir / "create-probe", "before")
        rows: dict[str, dict[int, float]] = {}
        with storescp(workdir) as r:
            rows[r.label] = measure(r, files, args.repeats)
        if not args.no_orthanc and shutil.which("Orthanc"):
            with orthanc(workdir) as r:
                rows[r.label] = measure(r, files, args.repeats)
        if not args.no_reference:
            with bare_pynetdicom(workdir) as r:
                rows[r.label] = measure(r, files, args.repeats)
        with secondreader(workdir, "secondreader (defaults: fsync, SQLite NORMAL)") as r:
            rows[r.label] = measure(r, files, args.repeats)
        for n in args.processes_row or [2, 4]:
            # Receiving processes sharing the port (daemon/stages/receive/receivers.py).
            with secondreader(
                workdir,
                f"secondreader, {n} receiving processes",
                {"SECONDREADER_SCP__PROCESSES": str(n)},
            ) as r:
                rows[r.label] = measure(r, files, args.repeats)
        for size in args.pdu_row:
            # Other PDU caps against the default: what bounding the memory a
            # peer may make us hold costs in throughput.
            with secondreader(
                workdir,
                f"secondreader, max PDU {size / 2**20:g} MiB",
                {"SECONDREADER_SCP__MAX_PDU_SIZE": str(size)},
            ) as r:
                rows[r.label] = measure(r, files, args.repeats)
        if not args.no_durability_off:
            with secondreader(
                workdir,
                "secondreader, DURABILITY OFF (no fsync)",
                {
                    "SECONDREADER_STORAGE__FSYNC": "false",
                    "SECONDREADER_DATABASE__SQLITE_SYNCHRONOUS": "NORMAL",
                },
            ) as r:
                rows[r.label] = measure(r, files, args.repeats)
        report_create_cost(workdir / "create-probe", "after")
        # Only now is anything deleted (see `create_cost`).

    base = rows["dcmtk storescp"]
    default = next(row for label, row in rows.items() if label.startswith("secondreader (defaults"))
    print()
    print(
        f"{'receiver':<56} {'1 assoc MB/s':>12} {'4 assoc MB/s':>12} {'ratio 1':>8} "
        f"{'ratio 4':>8} {'4 / 1':>6} {'4 / 1 def':>9}"
    )
    for label, row in rows.items():
        ours = label.startswith("secondreader")
        print(
            f"{label:<56} {row[1]:12.1f} {row[4]:12.1f} "
            f"{row[1] / base[1]:8.2f} {row[4] / base[4]:8.2f} {row[4] / row[1]:6.2f} "
            + (f"{row[4] / default[1]:9.2f}" if ours else f"{'':>9}")
        )
    print("ratio = MB/s of the receiver / MB/s of dcmtk storescp, same number of associations;")
    print("4 / 1 = the receiver's own 4-association MB/s over its 1-association MB/s;")
    print("4 / 1 def = our 4-association MB/s over the default configuration's 1-association MB/s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
