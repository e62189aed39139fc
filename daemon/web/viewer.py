"""The image viewer's data: the series' geometry and presets, each slice's pixels, the saliency.

The page's viewer (static/viewer.js) windows the modality values itself, so
window/level, zoom and slice changes need no round trip: a slice is fetched
once as little-endian int16 (float32 when its values are not integers that
fit) and kept. `image.png` is the server-rendered picture for a page without
JavaScript.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np
from flask import Blueprint, abort, current_app, jsonify, request, url_for
from pydicom import dcmread

from daemon.web import login_required
from daemon.web.images import SeriesImage, render
from daemon.web.result import _show, key_slice
from daemon.web.site import site
from db.reviews import ResultView, run_provenance, series_images
from db.saliency import read_saliency
from dicom_io.pixels import read_modality_pixels

bp = Blueprint("viewer", __name__, url_prefix="/results")

# CT presets (centre, width in HU), as reading rooms name them.
CT_PRESETS = [
    ("lung", "Lung", -600.0, 1500.0),
    ("mediastinum", "Mediastinum", 40.0, 400.0),
    ("bone", "Bone", 400.0, 1800.0),
    ("brain", "Brain", 40.0, 80.0),
]

_saliency: OrderedDict[int, tuple[list[str], np.ndarray]] = OrderedDict()
_saliency_lock = threading.Lock()


def _images(run_id: int) -> list[SeriesImage]:
    images = site().series(run_id)
    if not images:
        abort(404, "The images of this result are no longer on this server (retention).")
    return images


def _slice(images: list[SeriesImage], k: int) -> SeriesImage:
    if not 0 <= k < len(images):
        abort(404, f"No image {k + 1}: the series has {len(images)}.")
    return images[k]


@bp.get("/<int:run_id>/viewer.json")
@login_required
def geometry(run_id: int) -> Any:
    """What the viewer needs: slices, presets (the model's window first), findings, decisions."""
    view, _ = _show(run_id)
    images = _images(run_id)
    uids = [i.sop_instance_uid for i in images]
    index = {u: k for k, u in enumerate(uids)}
    with site().db.session() as s:
        provenance = run_provenance(s, run_id)
    key = key_slice(view, index, len(images))
    header = dcmread(images[key].path, stop_before_pixels=True)
    presets = _presets(view, header, provenance)
    findings = [
        {"number": f.number, "finding": f.finding, "present": f.present,
         "slice": index.get(f.sop_instance_uid or ""),
         "box": [f.box["col0"], f.box["row0"], f.box["col1"], f.box["row1"]] if f.box else None}
        for f in view.findings
    ]  # fmt: skip
    numbers = {f.finding_id: f.number for f in view.findings}
    decisions = []
    for d in view.decisions:
        where = d.location or {}
        point = where.get("point")
        decisions.append({
            "number": numbers.get(d.finding_id), "round": d.round, "decision": d.decision,
            "reviewer": d.reviewer, "slice": index.get(where.get("sop_instance_uid", "")),
            "point": [point["col"], point["row"]] if point else None,
        })  # fmt: skip
    return jsonify(
        slices=len(images), uids=uids, key=key, rows=int(header.Rows),
        columns=int(header.Columns), presets=presets, default=presets[0]["key"],
        findings=findings, decisions=decisions, saliency=_saliency_slices(run_id, index),
        slice_url=url_for("viewer.pixels", run_id=run_id, k=0).replace("/0.bin", "/{k}.bin"),
        saliency_url=url_for("viewer.saliency", run_id=run_id, k=0).replace("/0.bin", "/{k}.bin"),
    )  # fmt: skip


def _presets(view: ResultView, header: Any, provenance: dict[str, Any]) -> list[dict[str, Any]]:
    """The model's own window first (what it saw), then the header's, then the modality's."""
    out: list[dict[str, Any]] = []
    for step in provenance.get("steps", []):
        p = step.get("parameters") or {}
        if step.get("name") == "contrast" and p.get("method") == "window":
            out.append({"key": "model", "name": "AI model", "center": float(p["center"]),
                        "width": float(p["width"])})  # fmt: skip
    centre, width = header.get("WindowCenter"), header.get("WindowWidth")
    if centre is not None and width is not None:
        c = float(centre[0] if header["WindowCenter"].VM > 1 else centre)
        w = float(width[0] if header["WindowWidth"].VM > 1 else width)
        if w > 0 and str(header.get("PhotometricInterpretation", "")) != "MONOCHROME1":
            out.append({"key": "header", "name": "Image header", "center": c, "width": w})
    if (view.modality or "").upper() == "CT":
        out += [{"key": k, "name": n, "center": c, "width": w} for k, n, c, w in CT_PRESETS]
    out.append({"key": "auto", "name": "Full range", "center": None, "width": None})
    return out


@bp.get("/<int:run_id>/slices/<int:k>.bin")
@login_required
def pixels(run_id: int, k: int) -> Any:
    """Slice k's modality values (HU for CT), row by row, little-endian."""
    image = _slice(_images(run_id), k)
    values = read_modality_pixels(image.path)
    rounded = np.rint(values)
    if np.array_equal(rounded, values) and values.min() >= -32768 and values.max() <= 32767:
        data, dtype = rounded.astype("<i2"), "int16"
    else:
        data, dtype = values.astype("<f4"), "float32"
    response = current_app.response_class(data.tobytes(), mimetype="application/octet-stream")
    response.headers["X-Rows"], response.headers["X-Columns"] = str(data.shape[0]), str(
        data.shape[1])
    response.headers["X-Dtype"] = dtype
    return response


def _run_saliency(run_id: int) -> tuple[list[str], np.ndarray] | None:
    """The run's saliency map as uint8 (0-255 of its maximum), cached for a few runs."""
    with _saliency_lock:
        if run_id in _saliency:
            _saliency.move_to_end(run_id)
            return _saliency[run_id]
    with site().db.session() as s:
        _, relative = series_images(s, run_id)
    if relative is None:
        return None
    try:
        found = read_saliency(site().config.storage.state_dir / relative)
    except (OSError, ValueError, KeyError):
        return None  # its file is gone (retention)
    top = float(found.frames.max()) or 1.0
    entry = (found.source_sop_instance_uids,
             np.clip(found.frames / top * 255.0, 0, 255).astype(np.uint8))  # fmt: skip
    with _saliency_lock:
        _saliency[run_id] = entry
        while len(_saliency) > 4:
            _saliency.popitem(last=False)
    return entry


def _saliency_slices(run_id: int, index: dict[str, int]) -> list[int]:
    found = _run_saliency(run_id)
    return [] if found is None else sorted(index[u] for u in found[0] if u in index)


@bp.get("/<int:run_id>/saliency/<int:k>.bin")
@login_required
def saliency(run_id: int, k: int) -> Any:
    """Slice k's saliency, uint8 row by row; 404 where the map has nothing."""
    image = _slice(_images(run_id), k)
    found = _run_saliency(run_id)
    if found is None or image.sop_instance_uid not in found[0]:
        abort(404, "No saliency on this image.")
    plane = found[1][found[0].index(image.sop_instance_uid)]
    response = current_app.response_class(plane.tobytes(), mimetype="application/octet-stream")
    response.headers["X-Rows"], response.headers["X-Columns"] = str(plane.shape[0]), str(
        plane.shape[1])
    return response


@bp.get("/<int:run_id>/image.png")
@login_required
def image(run_id: int) -> Any:
    """One slice as PNG with the AI's box (and the saliency): the page without JavaScript."""
    view, _ = _show(run_id)
    images = _images(run_id)
    index = {i.sop_instance_uid: k for k, i in enumerate(images)}
    k = request.args.get("slice", type=int)
    shown = _slice(images, key_slice(view, index, len(images)) if k is None else k)
    box = None
    for f in view.findings:
        if f.present and f.sop_instance_uid == shown.sop_instance_uid and f.box:
            box = (f.box["col0"], f.box["row0"], f.box["col1"], f.box["row1"])
    overlay = None
    found = _run_saliency(run_id) if request.args.get("overlay") == "1" else None
    if found is not None and shown.sop_instance_uid in found[0]:
        overlay = found[1][found[0].index(shown.sop_instance_uid)].astype(np.float32)
    png, _scale = render(shown.path, box, overlay)
    return current_app.response_class(png, mimetype="image/png")
