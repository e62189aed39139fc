"""A result's story and provenance in words a reader uses.

The audit trail names internal steps (job.claimed, worker ids): the
reading room sees received, analysed, reported, sent, decided, undone,
amended and verified; administrators also get the raw events.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from db.audit import EventType
from db.reviews import ResultView
from dicom_io.wording import threshold_percent

_OBJECTS = {
    "sr": "AI result (SR)", "verified-sr": "verified SR", "pmap": "saliency map",
    "gsps": "annotation (GSPS)", "summary": "summary image", "seg": "saliency (SEG)",
    "binary-seg": "region (SEG)", "regions": "segmentation (SEG)",
}  # fmt: skip
_DECISIONS: dict[str | None, str] = {
    "confirm": "confirmed", "reject": "rejected", "correct": "corrected",
}  # fmt: skip


@dataclass(frozen=True)
class Step:
    at: datetime
    what: str  # "received", "analysed", "reported", "sent", "decided", "amended", ...
    text: str


def clinical_history(events: list[dict[str, Any]]) -> list[Step]:
    """The result's steps for a reader, oldest first; received images summed up in one."""
    steps: list[Step] = []
    stored = [e for e in events if e["event"] == EventType.INSTANCE_STORED]
    if stored:
        steps.append(Step(stored[0]["at"], "received",
                          f"{len(stored)} image(s) received, the last at "
                          f"{stored[-1]['at']:%H:%M:%S}"))  # fmt: skip
    for e in events:
        step = _step(e)
        if step is not None:
            steps.append(step)
    return sorted(steps, key=lambda s: s.at)


def _step(e: dict[str, Any]) -> Step | None:
    kind, d, at, who = e["event"], e["detail"] or {}, e["at"], e["actor"]
    finding = f"finding {d.get('finding')}"
    match kind:
        case EventType.STUDY_COMPLETED:
            return Step(at, "received", "study complete")
        case EventType.ANALYSIS_RECORDED:
            model = f" by {d['model']}" if d.get("model") else ""
            return Step(at, "analysed", f"analysed{model}: {d.get('outcome', '')}")
        case EventType.REPORT_CREATED:
            return Step(at, "reported", "AI result reported (SR, NOT VERIFIED)")
        case EventType.DELIVERY_DONE:
            what = _OBJECTS.get(str(d.get("object_kind")), str(d.get("object_kind")))
            return Step(at, "sent", f"{what} sent to {d.get('destination')}")
        case EventType.REVIEW_DECIDED:
            return Step(at, "decided", f"{finding} {_DECISIONS.get(d.get('decision'), '')} "
                                       f"by {who}")  # fmt: skip
        case EventType.REVIEW_UNDONE:
            return Step(at, "undone", f"decision(s) on finding(s) {d.get('findings')} undone "
                                      f"by {who}; nothing was sent")  # fmt: skip
        case EventType.REVIEW_AMENDED:
            decision = _DECISIONS.get(d.get("decision"), "")
            return Step(at, "amended", f"{finding} amended to {decision} by {who}")
        case EventType.VERIFIED_SR_CREATED:
            why = f"; reason: {d['reason']}" if d.get("reason") else ""
            return Step(at, "verified", f"verified SR signed by {who}{why}")
        case EventType.REPORT_FAILED | EventType.JOB_FAILED | EventType.DELIVERY_DEAD:
            return Step(at, "problem", f"{kind}: ask an administrator")
    return None


def provenance_lines(view: ResultView, provenance: dict[str, Any]) -> list[tuple[str, str]]:
    """How the AI came to its result, as (label, sentence) pairs."""
    lines = [("Algorithm", f"{view.model_name} {view.model_version}")]
    algo = provenance.get("algorithm", {})
    if algo.get("manufacturer"):
        lines.append(("Manufacturer", str(algo["manufacturer"])))
    params = algo.get("parameters", {})
    if "threshold" in params:
        threshold = threshold_percent(float(params["threshold"]))
        lines.append(("Threshold", f"{threshold}: at or above it, present"))
    for step in provenance.get("steps", []):
        name = str(step.get("name") or step.get("step") or "")
        p = step.get("parameters") or {k: v for k, v in step.items() if k not in ("name", "step")}
        lines.append((name.capitalize(), _step_words(name, p)))
    if view.model_device_uid:
        lines.append(("Device Observer UID", view.model_device_uid))
    if params.get("weights_sha256"):
        lines.append(("Weights SHA-256", str(params["weights_sha256"])))
    # The figures the model's manifest recorded on a shifted test set when the
    # run was made: what its call is worth, beside the call.
    for label, words in algo.get("evaluation", []):
        lines.append((f"Evaluation: {label}", str(words)))
    return lines


def _step_words(name: str, p: dict[str, Any]) -> str:
    if name == "load":
        return f"{p.get('slices')} image(s) read" + (
            f"; warnings: {'; '.join(p['warnings'])}" if p.get("warnings") else "")
    if name == "orientation":
        if not p.get("applied", True):
            return f"kept as acquired ({p.get('reason', 'no change needed')})"
        if p.get("source") == p.get("target"):
            return f"already {p.get('source')}"
        return f"turned from {p.get('source', '?')} to {p.get('target', '?')}"
    if name == "contrast" or name == "window":
        if p.get("method", "window") == "window" and "center" in p:
            return f"window centre {p['center']:g}, width {p['width']:g}"
        return str(p.get("method", ""))
    if name == "inference":
        return (f"{p.get('slices')} slice(s) on {p.get('device', 'an unknown device')}, "
                f"{p.get('aggregation', '')}")  # fmt: skip
    return ", ".join(f"{k.replace('_', ' ')} {_value(v)}" for k, v in sorted(p.items())) or "done"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list | tuple):
        return " × ".join(_value(x) for x in v)
    return str(v)
