"""End to end: from the last C-STORE response to our SR stored in the PACS.

One run, on loopback, with real peers: a synthetic chest CT (default 300
slices of 512x512, with a nodule) goes to `secondreader serve` by dcmtk's
storescu; the built-in model analyses it in the serve process (CPU here,
CUDA where there is a GPU); Debian's Orthanc is the PACS the results go to.
Twice:

1. with the quiet window (the defaults: complete 10 s after the last image,
   checked every 2 s);
2. with MPPS: the bench, as the modality, sends N-CREATE before the images
   and N-SET COMPLETED listing them all after; the quiet window is set to an
   hour, so only MPPS can complete the study.

Each twice again, in one run on one machine: with streaming off (every
image read and analysed at completion, as before issue 26) and on (the
worker reads, preprocesses and runs the 2D model on each image as it lands
in the spool: `worker.streaming`).

For each it prints the time from storescu's exit (the last C-STORE response)
to the SR being visible in Orthanc (polled every 20 ms), and where it went,
from the daemon's audit trail and the run's provenance: completion, queue
wait, load, preprocess, inference, the rest of the analysis (saliency,
region), report build, delivery; then how many slices were prepared while
receiving, and how long storescu took to send the study (streaming shares
the CPU with the receiver).

    .venv/bin/python bench/e2e.py [--slices 300] [--size 512] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # noqa: E402
from sqlalchemy import select  # noqa: E402

from bench.ingest import DCMTK_ENV, free_port, wait_port  # noqa: E402
from db.models import AnalysisRun, AuditEvent  # noqa: E402
from db.session import Database  # noqa: E402
from dicom_io.synthetic import write_ct_series  # noqa: E402
from model.phantom import phantom_volume  # noqa: E402

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


class Orthanc:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port, self.http = free_port(), free_port()
        root.mkdir()
        config = root / "orthanc.json"
        config.write_text(json.dumps({
            "Name": "bench", "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"), "DicomPort": self.port, "HttpPort": self.http,
            "DicomAet": "ORTHANC", "Plugins": [], "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
        }))  # fmt: skip
        self.proc = subprocess.Popen(
            ["Orthanc", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=root, env=DCMTK_ENV,
        )  # fmt: skip
        wait_port(self.port, self.proc)

    def has_sr(self, study_uid: str) -> bool:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http}/tools/find", method="POST",
            data=json.dumps({"Level": "Instance", "Query": {
                "StudyInstanceUID": study_uid, "SOPClassUID": SR_CLASS}}).encode(),
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as rsp:
            return bool(json.loads(rsp.read()))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


class Daemon:
    def __init__(self, root: Path, orthanc: Orthanc, env: dict[str, str]) -> None:
        root.mkdir()
        self.port = free_port()
        self.state = root / "state"
        config = root / "secondreader.toml"
        config.write_text(
            f'[scp]\nhost = "127.0.0.1"\nport = {self.port}\n'
            f'[storage]\nstate_dir = "{self.state}"\n'
            f'[[delivery.destinations]]\nname = "orthanc"\nae_title = "ORTHANC"\n'
            f'host = "127.0.0.1"\nport = {orthanc.port}\n'
        )
        self.env = {**os.environ, "SECONDREADER_CONFIG": str(config), **env}
        cli = [sys.executable, "-m", "daemon.cli"]
        subprocess.run([*cli, "db", "upgrade"], cwd=REPO, env=self.env, check=True,
                       capture_output=True)  # fmt: skip
        self.log = root / "serve.log"
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen([*cli, "serve"], cwd=REPO, env=self.env, stdout=fh,
                                         stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 300
        # Ready once the worker has loaded its models, not merely listening.
        while b"taking jobs" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(self.log.read_text()[-3000:])
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


def completed_step(files: list[Path]) -> Dataset:
    """The N-SET COMPLETED a modality sends: made before the images go, as a modality
    knows what it acquired; only sending it counts in the time measured."""
    first = dcmread(files[0], stop_before_pixels=True)
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ReferencedImageSequence = []
    for path in files:
        h = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        ref = Dataset()
        ref.ReferencedSOPClassUID = first.SOPClassUID
        ref.ReferencedSOPInstanceUID = h.SOPInstanceUID
        series.ReferencedImageSequence.append(ref)
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedSeriesSequence = [series]
    return ds


def mpps(port: int, step: str, study_uid: str, completed: Dataset | None) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="SECONDREADER")
    ds = Dataset()
    if completed is None:
        item = Dataset()
        item.StudyInstanceUID = study_uid
        ds.ScheduledStepAttributesSequence = [item]
        ds.PerformedProcedureStepStatus = "IN PROGRESS"
        ds.Modality = "CT"
        ds.PerformedSeriesSequence = []
        status, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, step)
    else:
        status, _ = assoc.send_n_set(completed, ModalityPerformedProcedureStep, step)
    assoc.release()
    if int(status.Status) != 0:
        raise RuntimeError(f"MPPS status 0x{int(status.Status):04X}")


def epoch(at: datetime) -> float:
    return at.replace(tzinfo=UTC).timestamp()


def run(label: str, workdir: Path, files: list[Path], env: dict[str, str], use_mpps: bool
        ) -> dict[str, float]:  # fmt: skip
    orthanc = Orthanc(workdir / f"orthanc-{label}")
    daemon = Daemon(workdir / f"d-{label}", orthanc, env)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    step = generate_uid()
    completed = completed_step(files) if use_mpps else None
    try:
        if use_mpps:
            mpps(daemon.port, step, study_uid, None)
        t_send = time.time()
        send = subprocess.run(
            ["storescu", "-aec", "SECONDREADER", "127.0.0.1", str(daemon.port),
             *map(str, files)], env=DCMTK_ENV, capture_output=True,
        )  # fmt: skip
        t0 = time.time()  # the last C-STORE response is in
        if send.returncode != 0:
            raise RuntimeError(send.stderr.decode(errors="replace"))
        if use_mpps:
            mpps(daemon.port, step, study_uid, completed)
        while not orthanc.has_sr(study_uid):
            if time.time() - t0 > 600:
                raise RuntimeError("no SR in Orthanc after 600 s")
            time.sleep(0.02)
        t_sr = time.time()
    finally:
        daemon.stop()
        orthanc.stop()
    db = Database(f"sqlite:///{daemon.state / 'secondreader.db'}")
    with db.session() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.study_instance_uid == study_uid)
                           .order_by(AuditEvent.id)).all()  # fmt: skip
        run_row = s.scalars(select(AnalysisRun)).first()
        provenance = list(run_row.provenance.get("steps", [])) if run_row else []
    db.dispose()

    def at(kind: str, last: bool = False) -> float:
        times = [epoch(e.at) for e in events if e.event_type == kind]
        return max(times) if last else min(times)

    steps = {p["name"]: float(p["seconds"] or 0.0) for p in provenance}
    early = next((int(p["parameters"].get("computed_while_receiving", 0)) for p in provenance
                  if p["name"] == "inference"), 0)  # fmt: skip
    load = steps.pop("load", 0.0)
    inference = steps.pop("inference", 0.0)
    preprocess = sum(steps.values())
    analysis = at("analysis.recorded") - at("job.claimed")
    sr_done = max(
        epoch(e.at) for e in events
        if e.event_type == "delivery.done" and e.sop_instance_uid == run_row.sr_sop_instance_uid
    )  # fmt: skip
    return {
        "total": t_sr - t0,
        "complete (quiet window or MPPS)": at("study.completed") - t0,
        "queue wait": at("job.claimed") - at("study.completed"),
        "load": load,
        "preprocess": preprocess,
        "inference": inference,
        "rest of analysis (saliency, region, record)": analysis - load - preprocess - inference,
        "report build": at("report.created") - at("analysis.recorded"),
        "delivery (SR stored in Orthanc)": sr_done - at("report.created"),
        "slices analysed while receiving": float(early),
        "storescu send time (not in total)": t0 - t_send,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="auto", help="worker.device: auto, cpu or cuda")
    parser.add_argument(
        "--only", choices=["window", "mpps"], help="one of the two runs (both by default)"
    )
    parser.add_argument(
        "--streaming", choices=["off", "on"], help="one of the two (both by default)"
    )
    parser.add_argument(
        "--keep", type=Path, help="copy each run's serve.log here (for a closer look)"
    )
    args = parser.parse_args()
    for tool in ("storescu", "Orthanc"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found (Debian packages dcmtk, orthanc)")
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        workdir = Path(tmp)
        spacing = (1.0, 350.0 / args.size, 350.0 / args.size)
        volume, _ = phantom_volume(7, n_slices=args.slices, rows=args.size, cols=args.size,
                                   lesion=True, spacing=spacing)  # fmt: skip
        files = write_ct_series(volume, workdir / "ct", spacing=spacing, seed=7)
        mb = sum(p.stat().st_size for p in files) / 1e6
        print(f"study: {len(files)} CT slices of {args.size}x{args.size}, {mb:.0f} MB", flush=True)
        rows: dict[str, dict[str, float]] = {}
        for streaming in ("false", "true"):
            if args.streaming and streaming != {"off": "false", "on": "true"}[args.streaming]:
                continue
            device = {"SECONDREADER_WORKER__DEVICE": args.device,
                      "SECONDREADER_WORKER__STREAMING": streaming}  # fmt: skip
            tag = "streaming" if streaming == "true" else "at completion"
            if args.only != "mpps":
                rows[f"window, {tag}"] = run(f"quiet-{streaming}", workdir, files, device,
                                             use_mpps=False)  # fmt: skip
            quiet_hour = {**device, "SECONDREADER_COMPLETION__STABLE_SECONDS": "3600"}
            if args.only != "window":
                rows[f"MPPS, {tag}"] = run(f"mpps-{streaming}", workdir, files, quiet_hour,
                                           use_mpps=True)  # fmt: skip
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for log in workdir.glob("d-*/serve.log"):
                shutil.copy(log, args.keep / f"{log.parent.name}.log")
    names = list(next(iter(rows.values())))
    print()
    print(f"{'seconds from the last C-STORE response':<46}" + "".join(f"{k:>24}" for k in rows))
    for name in names:
        print(f"{name:<46}" + "".join(f"{row[name]:24.2f}" for row in rows.values()))
    print()
    for mode in ("window", "MPPS"):
        before, after = rows.get(f"{mode}, at completion"), rows.get(f"{mode}, streaming")
        if before and after:
            print(f"{mode}: streaming saved {before['total'] - after['total']:.2f} s "
                  f"({before['total']:.2f} -> {after['total']:.2f} s, "
                  f"x{before['total'] / after['total']:.2f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
