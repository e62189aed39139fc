"""The sentences a radiologist reads about an AI finding, in one place.

The same words go into the SR's Comment (the measurement label OHIF shows),
the GSPS text annotation and the summary image, so that every viewer says
the same thing. No codes, no unit symbols a reader has to decode, and the
fact that nobody has verified the result is in every sentence.
"""

from __future__ import annotations

from model.results import AlgorithmInfo, Finding

NOT_VERIFIED = "NOT VERIFIED"
DISCLAIMER = "AI RESULT - NOT VERIFIED - not for diagnosis without physician review"


def percent(probability: float, threshold: float | None = None) -> str:
    """"97 %": whole percent, or more decimals where rounding would mislead.

    Against a threshold, the number must never seem to contradict present /
    absent: 0.949 against 0.95 reads "94.9 %", not "95 %". A probability
    short of certainty never reads "100 %" (0.9999 reads "> 99.9 %"), nor one
    above zero "0 %". A threshold reads as `threshold_percent` writes it.
    """
    value = 100.0 * float(probability)
    limit = None if threshold is None else 100.0 * float(threshold)
    shown_limit = None if threshold is None else float(threshold_percent(threshold)[:-2])
    for decimals in (0, 1, 2):
        shown = round(value, decimals)
        if shown == 100.0 and value < 100.0 or shown == 0.0 and value > 0.0:
            continue
        if limit is None or shown_limit is None:
            return f"{shown:.{decimals}f} %"
        agrees = (shown >= shown_limit) == (value >= limit)
        if agrees and (shown != shown_limit or value == limit):
            return f"{shown:.{decimals}f} %"
    if value >= 50.0:
        return "> 99.99 %" if value < 100.0 else "100 %"
    return "< 0.01 %" if value > 0.0 else "0 %"


def threshold_percent(threshold: float) -> str:
    """"95 %", or "98.5 %": a threshold is shown to one decimal unless it is whole."""
    value = 100.0 * float(threshold)
    whole = round(value)
    return f"{whole} %" if abs(value - whole) < 0.05 else f"{value:.1f} %"


SIDES = {"L": "left", "R": "right"}


def volume(ml: float) -> str:
    """"4.27 mL"; "0.052 mL": three significant figures, no more than the voxels can say."""
    return f"{ml:.3g} mL" if ml < 100 else f"{ml:.0f} mL"


def finding_phrase(finding: Finding) -> str:
    """"Nodule present, 97 % (threshold 95 %)"; "Mass, right, present on R CC, R MLO, ..."."""
    state = "present" if finding.present else "absent"
    side = f", {SIDES.get(finding.laterality, finding.laterality)}" if finding.laterality else ""
    if finding.lesion is not None:
        side += f" {finding.lesion}"
    if finding.diameter_mm is not None and finding.present:
        state += f", {finding.diameter_mm:.0f} mm"
    if finding.volume_ml is not None and finding.present:
        state += f", {volume(finding.volume_ml)}"
    seen = ""
    if finding.present and finding.views:
        seen = f" on {', '.join(finding.views)}"
    elif finding.view:
        seen = f" ({finding.view})"
    return (
        f"{finding.finding_type.meaning}{side} {state}{seen}, "
        f"{percent(finding.probability, finding.threshold)} "
        f"(threshold {threshold_percent(finding.threshold)})"
    )


def model_name(algorithm: AlgorithmInfo) -> str:
    return f"{algorithm.name} {algorithm.version}"


# How every AI label starts. OHIF 3.13.2 cuts a measurement's label in its
# panel after two lines (the rest only in a tooltip), and once the measurement
# is tracked it draws no label on the image: what must never be lost comes first.
AI_LABEL_PREFIX = f"AI, {NOT_VERIFIED}: "


def finding_label(finding: Finding, algorithm: AlgorithmInfo) -> str:
    """The one-line label of an AI finding, as the SR Comment and the GSPS carry it.

    "AI, NOT VERIFIED: Nodule present, 97 % (threshold 95 %) - demo-model 1.0.0".
    """
    return f"{AI_LABEL_PREFIX}{finding_phrase(finding)} - {model_name(algorithm)}"


def reviewed_label(label: str) -> str:
    """An AI label once a physician has decided on it: the AI's words, NOT VERIFIED dropped.

    "AI, NOT VERIFIED: Nodule present, 97 % ... - model 1.0" gives "AI: Nodule
    present, 97 % ... - model 1.0"; so does the older form "AI: Nodule present,
    97 % ..., NOT VERIFIED - model 1.0" of SRs written before the prefix.
    """
    if label.startswith(AI_LABEL_PREFIX):
        return "AI: " + label.removeprefix(AI_LABEL_PREFIX)
    return label.replace(f", {NOT_VERIFIED}", "")


def negative_headline(finding: Finding) -> str:
    """"No nodule found": what the summary card of a negative study says first."""
    return f"No {finding.finding_type.meaning.lower()} found"
