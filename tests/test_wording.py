"""What a radiologist reads about a finding (dicom_io/wording.py): never a misleading number."""

from __future__ import annotations

import pytest

from dicom_io.wording import (
    finding_label,
    negative_headline,
    percent,
    reviewed_label,
    threshold_percent,
)
from model.results import AlgorithmInfo, CodedConcept, Finding


@pytest.mark.parametrize(
    ("probability", "threshold", "text"),
    [
        (0.97, 0.95, "97 %"),
        (0.95, 0.95, "95 %"),  # exactly at the threshold: present, and reads so
        (0.949, 0.95, "94.9 %"),  # "95 %" would read as reaching it
        (0.4999, 0.5, "49.99 %"),
        (0.986, 0.985298, "99 %"),
        (0.984, 0.985298, "98 %"),
        (0.9999992, 0.985298, "> 99.99 %"),  # short of certainty: never "100 %"
        (0.0001, 0.5, "0.01 %"),  # above zero: never "0 %"
        (1.0, 0.5, "100 %"),
        (0.0, 0.5, "0 %"),
    ],
)
def test_percent_never_contradicts_the_threshold(
    probability: float, threshold: float, text: str
) -> None:
    assert percent(probability, threshold) == text
    shown, limit = text.lstrip("<> ").removesuffix(" %"), threshold_percent(threshold)[:-2]
    if not text.startswith(("<", ">")):
        assert (float(shown) >= float(limit)) == (probability >= threshold)


def test_threshold_is_whole_or_one_decimal() -> None:
    assert threshold_percent(0.95) == "95 %"
    assert threshold_percent(0.985298) == "98.5 %"


def test_label_has_words_not_codes_and_says_not_verified() -> None:
    algorithm = AlgorithmInfo(
        name="demo-nodule", version="1.0.0", manufacturer="secondreader", device_uid="1.2.3"
    )
    finding = Finding(
        label="nodule",
        finding_type=CodedConcept("27925004", "SCT", "Nodule"),
        finding_site=CodedConcept("39607008", "SCT", "Lung"),
        probability=0.973,
        threshold=0.95,
        location=None,
    )
    label = finding_label(finding, algorithm)
    # "AI, NOT VERIFIED" first: the part OHIF's two-line panel never cuts off.
    assert label == "AI, NOT VERIFIED: Nodule present, 97 % (threshold 95 %) - demo-nodule 1.0.0"
    assert reviewed_label(label) == "AI: Nodule present, 97 % (threshold 95 %) - demo-nodule 1.0.0"
    # SRs written before the prefix read the same once reviewed.
    older = "AI: Nodule present, 97 % (threshold 95 %), NOT VERIFIED - demo-nodule 1.0.0"
    assert reviewed_label(older) == reviewed_label(label)
    assert negative_headline(finding) == "No nodule found"
