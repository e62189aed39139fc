"""Source image headers, repaired for the objects we build from them.

Real images lack Type 2 attributes (PatientID, PatientBirthDate, even
Modality), carry malformed values ('1923-04-19' as a DA) or were
de-identified without saying how. highdicom copies the patient and study
modules from the source into our SR and SEG, and fails on the first
missing or unreadable one, so the report stage reads every header through
`read_header`: what cannot be read is dropped, what is required is present,
empty if need be.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

# Type 2 attributes of the Patient and General Study modules that highdicom
# copies into every derived object: present, empty when unknown.
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
UNKNOWN_MODALITY = "OT"  # "Other" (PS3.3 C.7.3.1.1.1)
UNSTATED_DEIDENTIFICATION = "Not stated by the source (Patient Identity Removed = YES)"

_FORMATS = {
    "DA": re.compile(r"^\d{8}$"),
    "TM": re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$"),
    "DT": re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$"),
}
_SEXES = {"M", "F", "O", ""}


def _well_formed(ds: Dataset, keyword: str) -> bool:
    elem = ds[keyword]
    value = elem.value
    pattern = _FORMATS.get(elem.VR)
    if pattern is not None and value not in (None, ""):
        values = value if elem.VM > 1 else [value]
        return all(pattern.match(str(getattr(v, "original_string", v)).strip()) for v in values)
    if keyword == "PatientSex":
        return str(value or "") in _SEXES
    return True


def clean_header(ds: Dataset, modality: str | None = None) -> Dataset:
    """A copy of `ds` without unreadable elements, with what highdicom needs.

    `modality` stands in for a missing Modality (from the series record);
    without it the object is "OT".
    """
    out = Dataset()
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    # Reading a malformed value warns (pydicom quotes the value: PHI); every
    # element is checked here, so the warning says nothing new.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tag in list(ds.keys()):
            try:
                elem = ds[tag]
                _ = elem.value  # converts a raw element: raises when malformed
                out.add(elem)
                if elem.keyword and not _well_formed(out, elem.keyword):
                    del out[tag]
            except Exception:  # noqa: S112 - an unreadable element is dropped, by design
                out.pop(tag, None)
                continue
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in out or out[keyword].value is None:
            setattr(out, keyword, "")
    if not str(out.get("Modality", "") or "").strip():
        out.Modality = (modality or "").strip() or UNKNOWN_MODALITY
    if str(out.get("PatientIdentityRemoved", "")).upper() == "YES" and not (
        out.get("DeidentificationMethod") or out.get("DeidentificationMethodCodeSequence")
    ):
        # Type 1C once identity is removed; the source did not say how.
        out.DeidentificationMethod = UNSTATED_DEIDENTIFICATION
    return out


def read_header(path: Path, modality: str | None = None) -> Dataset:
    """The header of a spool file (no pixel data), cleaned as above."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(path, stop_before_pixels=True)
    return clean_header(ds, modality)
