"""OHIF 3.13.2 in headless Chromium, reading a real Orthanc over DICOMweb.

As a radiologist's browser would see it (shared notes, "Viewers"):

* `ViewerServer` serves OHIF's built `dist/` at `/` from loopback, falls back
  to index.html for the SPA routes (/viewer), writes the app config the test
  asks for, and passes `/dicom-web` and `/wado` through to Orthanc on the same
  origin (no CORS). Orthanc's DICOMweb 1.7 ignores `includefield=a,b`; the
  proxy splits it into repeated parameters, as the notes describe.
* `browser()` starts Debian's Chromium through Playwright, with SwiftShader
  for WebGL, and records every console message of the page.
"""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.fetch_ohif import DIST, VERSION

CHROMIUM = "/usr/bin/chromium"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
# Orthanc with its DICOMweb plugin, at the roots the OHIF data source names.
ORTHANC_DICOMWEB = {
    "Plugins": [DICOMWEB_PLUGIN],
    "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado"},
}

_TYPES = {
    ".js": "application/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
}


def app_config() -> str:
    """OHIF's window.config: one DICOMweb source on this origin (shared notes)."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc (test PACS)",
            "name": "orthanc",
            "qidoRoot": "/dicom-web",
            "wadoRoot": "/dicom-web",
            "wadoUriRoot": "/wado",
            "qidoSupportsIncludeField": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "defaultDataSourceName": "orthanc",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


class ViewerServer:
    """OHIF's dist/ and a same-origin DICOMweb proxy to Orthanc, on loopback."""

    def __init__(self, orthanc_url: str, dist: Path = DIST) -> None:
        if not (dist / "index.html").exists():
            pytest.fail(
                f"OHIF {VERSION} is not fetched: run `.venv/bin/python tests/fetch_ohif.py` "
                "(make test does)"
            )
        self.dist = dist
        self.orthanc_url = orthanc_url.rstrip("/")
        self.config = app_config()
        self.proxied: list[str] = []  # every path passed to Orthanc, for the PHI check
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> ViewerServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        viewer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def do_GET(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                if path.startswith(("/dicom-web", "/wado")):
                    self._proxy()
                elif path == "/app-config.js":
                    self._send(200, viewer.config.encode(), "application/javascript")
                else:
                    self._static(path)

            def _static(self, path: str) -> None:
                file = (viewer.dist / path.lstrip("/")).resolve()
                if not file.is_relative_to(viewer.dist.resolve()) or not file.is_file():
                    if Path(path).suffix:  # an asset that does not exist
                        self._send(404, b"not found", "text/plain")
                        return
                    file = viewer.dist / "index.html"  # SPA route (/viewer, /)
                kind = _TYPES.get(file.suffix, "application/octet-stream")
                self._send(200, file.read_bytes(), kind)

            def _proxy(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                query = []
                for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
                    if key == "includefield":
                        query += [(key, v) for v in value.split(",") if v]
                    else:
                        query.append((key, value))
                target = viewer.orthanc_url + parts.path
                if query:
                    target += "?" + urllib.parse.urlencode(query)
                viewer.proxied.append(self.path)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept",)}
                request = urllib.request.Request(target, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=60) as rsp:
                        body, status = rsp.read(), rsp.status
                        kind = rsp.headers.get("Content-Type", "application/octet-stream")
                except urllib.error.HTTPError as err:
                    body, status = err.read(), err.code
                    kind = err.headers.get("Content-Type", "text/plain")
                self._send(status, body, kind)

            def _send(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

        return Handler


@contextmanager
def browser(width: int = 1600, height: int = 1000) -> Iterator[Any]:
    """A Playwright page in headless Debian Chromium; `page.console` lists its messages.

    `new_page(page)` opens another page of the same browser profile (OHIF's
    dismissed tour stays dismissed), with a console list of its own.
    """
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed (Debian package chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chrome = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--use-angle=swiftshader",
                "--enable-unsafe-swiftshader",
                "--ignore-gpu-blocklist",
                "--no-sandbox",  # CI runs as root
                "--disable-dev-shm-usage",
                # The machine has no network beyond loopback: no background calls.
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            context = chrome.new_context(viewport={"width": width, "height": height})
            yield _with_console(context.new_page())
        finally:
            chrome.close()


def new_page(page: Any) -> Any:
    """Another page in `page`'s browser profile, its console recorded."""
    return _with_console(page.context.new_page())


def _with_console(page: Any) -> Any:
    messages: list[str] = []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    page.console = messages
    return page
