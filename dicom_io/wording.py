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
    """"97 %": a whole percent, or one decimal where rounding would blur the threshold.

    A probability of 0.949 against a threshold of 0.95 reads "94.9 %", not
    "95 %": the number must never seem to contradict present / absent.
    """
    value = 100.0 * float(probability)
    whole = round(value)
    if threshold is not None:
        limit = 100.0 * float(threshold)
        if (value >= limit) != (whole >= limit) or (whole == round(limit) and value != limit):
            return f"{value:.1f} %"
    if whole == 100 and value < 100.0:
        return "> 99 %"
    if whole == 0 and value > 0.0:
        return "< 1 %"
    return f"{whole} %"


def finding_phrase(finding: Finding) -> str:
    """"Nodule present, 97 % (threshold 95 %)"."""
    state = "present" if finding.present else "absent"
    return (
        f"{finding.finding_type.meaning} {state}, "
        f"{percent(finding.probability, finding.threshold)} "
        f"(threshold {percent(finding.threshold)})"
    )


def model_name(algorithm: AlgorithmInfo) -> str:
    return f"{algorithm.name} {algorithm.version}"


def finding_label(finding: Finding, algorithm: AlgorithmInfo) -> str:
    """The one-line label of an AI finding, as the SR Comment and the GSPS carry it.

    "AI: Nodule present, 97 % (threshold 95 %), NOT VERIFIED - demo-model 1.0.0".
    """
    return f"AI: {finding_phrase(finding)}, {NOT_VERIFIED} - {model_name(algorithm)}"


def negative_headline(finding: Finding) -> str:
    """"No nodule found": what the summary card of a negative study says first."""
    return f"No {finding.finding_type.meaning.lower()} found"
