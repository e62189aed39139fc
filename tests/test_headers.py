"""Source headers repaired for the objects we build (dicom_io/headers.py)."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import DataElement

from dicom_io.headers import (
    TYPE2_PATIENT_STUDY,
    UNKNOWN_MODALITY,
    UNSTATED_DEIDENTIFICATION,
    clean_header,
    read_header,
)
from tests.dicomgen import sample_file


def test_missing_type2_attributes_become_empty_and_modality_is_filled() -> None:
    ds = dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True)
    for keyword in (*TYPE2_PATIENT_STUDY, "Modality"):
        if keyword in ds:
            delattr(ds, keyword)
    out = clean_header(ds)
    assert all(out[k].value in ("", None) for k in TYPE2_PATIENT_STUDY)
    assert out.Modality == UNKNOWN_MODALITY
    assert clean_header(ds, modality="CT").Modality == "CT"
    assert out.SOPInstanceUID == ds.SOPInstanceUID  # the rest is kept


def test_malformed_values_are_dropped_and_emptied(tmp_path: Path) -> None:
    ds = dcmread(sample_file("CT_small.dcm"))
    ds["PatientBirthDate"] = DataElement(0x00100030, "DA", "1923-04-19")
    ds["StudyTime"] = DataElement(0x00080030, "TM", "25:61")
    ds["PatientSex"] = DataElement(0x00100040, "CS", "QQ")
    path = tmp_path / "bad.dcm"
    ds.save_as(path)
    out = read_header(path)
    assert (out.PatientBirthDate, out.StudyTime, out.PatientSex) == ("", "", "")
    assert out.PatientName == ds.PatientName


def test_deidentified_source_states_its_method() -> None:
    ds = dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True)
    ds.PatientIdentityRemoved = "YES"
    for keyword in ("DeidentificationMethod", "DeidentificationMethodCodeSequence"):
        if keyword in ds:
            delattr(ds, keyword)
    assert clean_header(ds).DeidentificationMethod == UNSTATED_DEIDENTIFICATION
    ds.DeidentificationMethod = "Basic Application Confidentiality Profile"
    assert clean_header(ds).DeidentificationMethod == "Basic Application Confidentiality Profile"
