"""OHIF 3.13.2 in headless Chromium, reading a real Orthanc over DICOMweb.

As a radiologist's browser would see it (shared notes, "Viewers"):

* `ViewerServer` serves OHIF's built `dist/` at `/` from loopback, falls back
  to index.html for the SPA routes (/viewer), writes the app config the test
  asks for, and passes `/dicom-web` and `/wado` through to Orthanc on the same
  origin (no CORS). Orthanc's DICOMweb 1.7 ignores `includefield=a,b`; the
  proxy splits it into repeated parameters, as the notes describe.
* `browser()` starts Debian's Chromium through Playwright, with SwiftShader
  for WebGL, and records every console message of the page.
* `view()`, `show_slice()`, `canvas_pixels()` and `colour_through_volume()`
  read where OHIF really draws: the active viewport's plane, its own
  canvas-to-patient mapping and its rendered pixels, in millimetres.
"""

from __future__ import annotations

import base64
import io
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

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Error as PlaywrightError

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


# -- Where OHIF draws: its own screen-to-patient mapping, not its labels ------
#
# OHIF's "I:" slice label is not a position (in the parametric map's view it
# counts from the other end), so positions are read the way OHIF renders
# them: the active viewport's camera (the plane shown, along its normal) and
# its canvasToWorld mapping (window.cornerstone, which OHIF exposes).

_ACTIVE_VIEWPORT = """() => {
  const id = window.services.viewportGridService.getState().activeViewportId;
  const enabled = window.cornerstone.getEnabledElements().find(e => e.viewport.id === id);
  if (!enabled) {
    throw new Error('no cornerstone viewport is active');
  }
  return enabled.viewport;
}"""

_VIEW = f"""() => {{
  const vp = ({_ACTIVE_VIEWPORT})();
  const box = vp.canvas.getBoundingClientRect();
  const cam = vp.getCamera();
  const n = cam.viewPlaneNormal;
  const f = cam.focalPoint;
  // Counted on the element: OHIF may replace a viewport's element under the
  // same id (it does when it hydrates a SEG), and the old one renders no more.
  if (vp.element.__renders === undefined) {{
    vp.element.__renders = 0;
    vp.element.addEventListener('CORNERSTONE_IMAGE_RENDERED', () => vp.element.__renders++);
  }}
  return {{
    box: [box.x, box.y, box.width, box.height],
    origin: Array.from(vp.canvasToWorld([0, 0])),
    right: Array.from(vp.canvasToWorld([1, 0])),
    down: Array.from(vp.canvasToWorld([0, 1])),
    normal: Array.from(n),
    plane: f[0] * n[0] + f[1] * n[1] + f[2] * n[2],
    renders: vp.element.__renders,
    voi: vp.getProperties ? (vp.getProperties().voiRange || null) : null,
    actors: vp.getActors().length,
    slice: vp.getSliceIndex(),
    slices: vp.getNumberOfSlices(),
    modality: vp.modality || null,
  }};
}}"""


class View:
    """What the active viewport shows: its canvas on the page and OHIF's own geometry.

    `plane` is the shown plane's position along its normal, in mm; `to_world`
    maps canvas pixels to patient coordinates (mm) as OHIF does; `voi` is
    the window (lower and upper value) OHIF applies.
    """

    def __init__(self, raw: dict[str, Any]) -> None:
        self.box = tuple(float(v) for v in raw["box"])
        self.origin = np.asarray(raw["origin"], dtype=float)
        self.step_right = np.asarray(raw["right"], dtype=float) - self.origin
        self.step_down = np.asarray(raw["down"], dtype=float) - self.origin
        self.normal = np.asarray(raw["normal"], dtype=float)
        self.plane = float(raw["plane"])
        self.renders = int(raw["renders"])
        self.voi = raw["voi"]
        self.actors = int(raw["actors"])  # images drawn together: 2 for CT and map
        # Which of how many planes, only to know where the stack ends.
        self.slice, self.slices = int(raw["slice"]), int(raw["slices"])
        self.modality = raw["modality"]

    def to_world(self, columns: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Patient coordinates (n, 3) of the centres of canvas pixels (column, row)."""
        c = np.asarray(columns, dtype=float)[:, None] + 0.5
        r = np.asarray(rows, dtype=float)[:, None] + 0.5
        return self.origin + c * self.step_right + r * self.step_down


# OHIF's English for the display-set message codes we meet (its en-US "Messages").
DISPLAY_SET_MESSAGES = {
    2: "Display set has missing position information.",
    3: "Display set is not a reconstructable 3D volume.",
    14: "SOP Class UID {{ sopClassUid }} is not supported.",
}


def display_set_messages(page: Any, series_description: str) -> list[str]:
    """The warnings OHIF keeps for a series (the sign on its thumbnail), in its English."""
    found = page.evaluate(
        """(description) => window.services.displaySetService.getActiveDisplaySets()
          .filter(d => (d.SeriesDescription || '').includes(description))
          .flatMap(d => (d.messages ? d.messages.messages : []).map(m => [m.id, m.args || {}]))""",
        series_description,
    )
    messages = []
    for code, args in found:
        text = DISPLAY_SET_MESSAGES.get(int(code), f"message {code}")
        for key, value in args.items():
            text = text.replace("{{ " + key + " }}", str(value))
        messages.append(text)
    return messages


def view(page: Any) -> View:
    return View(page.evaluate(_VIEW))


def view_when_shown(page: Any) -> View | None:
    """The active viewport's view, or None while OHIF has none (it is swapping display sets)."""
    try:
        return view(page)
    except PlaywrightError:
        return None


def canvas_pixels(page: Any) -> np.ndarray:
    """The active viewport's canvas as OHIF rendered it, RGB (rows, columns, 3).

    Read from the canvas itself: the image and its overlays, without the
    viewport's icons, labels and annotations drawn over it in HTML and SVG.
    """
    data = page.evaluate(
        f"""() => {{
          const canvas = ({_ACTIVE_VIEWPORT})().canvas;
          return canvas.toDataURL('image/png');
        }}"""
    )
    png = base64.b64decode(data.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def show_slice(page: Any, index: int, timeout_ms: float = 30_000) -> View:
    """Move the active viewport to plane `index` of its stack; return the view once drawn.

    Through cornerstone's own jumpToSlice (what OHIF's scroll tools call), then
    waits for that plane to be shown and for a render after the move.
    """
    before = view(page)
    if before.slice == index:
        return before
    page.evaluate(
        f"""async () => {{
          const vp = ({_ACTIVE_VIEWPORT})();
          await window.cornerstone.utilities.jumpToSlice(vp.element, {{imageIndex: {index}}});
        }}"""
    )
    drawn = f"""() => {{
      const v = ({_VIEW})();
      return v.slice === {index} && v.renders > {before.renders};
    }}"""
    page.wait_for_function(drawn, timeout=timeout_ms)
    return view(page)


def coloured(rgb: np.ndarray, spread: int = 80) -> np.ndarray:
    """Pixels far from grey (max - min channel above `spread`): colour over a grayscale image."""
    return (rgb.max(axis=2) - rgb.min(axis=2)) > spread


def colour_through_volume(page: Any, spread: int = 80) -> list[tuple[float, np.ndarray]]:
    """Every plane of the active viewport: (its position in mm, its coloured pixels in mm).

    The second array holds the patient coordinates (n, 3) of the coloured
    pixels of that plane's rendered canvas (see `coloured` for `spread`).
    """
    planes = []
    for index in range(view(page).slices):
        shown = show_slice(page, index)
        rows, columns = np.nonzero(coloured(canvas_pixels(page), spread))
        planes.append((shown.plane, shown.to_world(columns, rows)))
    return planes
