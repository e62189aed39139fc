"""A real Orthanc (Debian package) as the PACS of a test: loopback only, storage in tmp.

The test writes Orthanc's JSON configuration (DICOM and HTTP ports, AE title,
the modalities it may call back, e.g. our SCP for storage commitment
reports), starts /usr/sbin/Orthanc, waits for its REST API and stops it at
the end. Stopping and starting again keeps its storage, as a PACS restart does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

ORTHANC = "/usr/sbin/Orthanc"


class Orthanc:
    def __init__(
        self,
        root: Path,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if shutil.which(ORTHANC) is None and not Path(ORTHANC).exists():
            pytest.fail("Orthanc is not installed (Debian package orthanc)")
        self.root = root
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.storage = root / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "orthanc.json"
        self.log_path = root / "orthanc.log"
        self.config: dict[str, Any] = {
            "Name": "secondreader-test-pacs",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "DicomCheckCalledAet": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            # No plugins: the Debian defaults (DICOMweb, worklists) are not needed.
            "Plugins": [],
            "DicomModalities": modalities or {},
            "DicomScuTimeout": 10,
            "StorageCommitmentReportsSize": 100,
            # The tests read Orthanc's log; keep it free of patient attributes too.
            "DeidentifyLogs": True,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
        }
        self.config.update(extra or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30) -> Orthanc:
        self.config_path.write_text(json.dumps(self.config, indent=2))
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [ORTHANC, "--verbose", str(self.config_path)],
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited early:\n{self.log()[-4000:]}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        raise RuntimeError(f"Orthanc not ready in {timeout} s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- REST ----------------------------------------------------------------
    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as rsp:
            return json.loads(rsp.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as rsp:
            return bytes(rsp.read())

    def find_study(self, study_uid: str) -> str | None:
        """Orthanc's id of the study with this Study Instance UID."""
        req = urllib.request.Request(
            self.url + "/tools/lookup", data=study_uid.encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=10) as rsp:
            hits = json.loads(rsp.read())
        ids = [h["ID"] for h in hits if h["Type"] == "Study"]
        return ids[0] if ids else None

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Every instance of the study, each with its main DICOM tags and its series' Modality."""
        study_id = self.find_study(study_uid)
        if study_id is None:
            return []
        out = []
        for series in self.get(f"/studies/{study_id}/series"):
            modality = series["MainDicomTags"].get("Modality")
            for instance_id in series["Instances"]:
                tags = self.get(f"/instances/{instance_id}/simplified-tags")
                out.append({"ID": instance_id, "Modality": modality, **tags})
        return out


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator:
    started: list[Orthanc] = []

    def make(name: str = "orthanc", **kwargs: Any) -> Orthanc:
        o = Orthanc(tmp_path / name, **kwargs)
        started.append(o)
        return o

    yield make
    for o in started:
        o.stop()
