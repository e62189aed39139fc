"""What governance records of a series: header values, age band and sex, never identity."""

from __future__ import annotations

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from model.observation import acquisition, age_band, intensity


def _header(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_age_band_from_age_or_birth_date() -> None:
    assert age_band(_header(PatientAge="045Y")) == "40-59"
    assert age_band(_header(PatientAge="006M")) == "0-17"
    assert age_band(_header(PatientAge="080Y")) == "80+"
    # Without Patient's Age: the birth date at the study date.
    assert age_band(_header(PatientBirthDate="19600315", StudyDate="20261205")) == "60-79"
    assert age_band(_header(PatientBirthDate="1960", StudyDate="20261205")) is None
    assert age_band(_header(PatientAge="45 years")) is None
    assert age_band(Dataset()) is None


def test_acquisition_values_and_malformed_ones() -> None:
    ds = _header(Manufacturer="ACME", ManufacturerModelName="Scan 9",
                 ConvolutionKernel=["B", "30f"], SliceThickness="1.25", KVP="120",
                 PixelSpacing=["0.7", "0.8"], ContrastBolusAgent="Iohexol")  # fmt: skip
    got = acquisition(ds)
    assert got == {"manufacturer": "ACME", "manufacturer_model": "Scan 9", "kernel": "B\\30f",
                   "slice_thickness": 1.25, "kvp": 120.0, "pixel_spacing": 0.75,
                   "contrast": "yes"}  # fmt: skip
    # As read from a hostile file: the values are decoded only when asked for.
    bad = Dataset({
        Tag(0x00180050): RawDataElement(Tag(0x00180050), "DS", 12, b"not a number", 0, False, True),
        Tag(0x00280030): RawDataElement(Tag(0x00280030), "DS", 4, b"x\\y", 0, False, True),
    })  # fmt: skip
    got = acquisition(bad)
    assert got["slice_thickness"] is None and got["pixel_spacing"] is None
    assert got["contrast"] == "no" and got["manufacturer"] is None


def test_intensity_follows_the_noise_not_the_anatomy() -> None:
    rng = np.random.default_rng(7)
    ramp = np.linspace(-1000, 1000, 256, dtype=np.float32)  # smooth "anatomy" along each row
    volume = np.broadcast_to(ramp, (20, 256, 256)).astype(np.float32)
    quiet = intensity(volume + rng.normal(0, 5, volume.shape).astype(np.float32))
    noisy = intensity(volume + rng.normal(0, 20, volume.shape).astype(np.float32))
    assert abs(float(quiet["noise"]) - 5) < 0.6  # type: ignore[arg-type]
    assert abs(float(noisy["noise"]) - 20) < 2  # type: ignore[arg-type]
    assert -1000 < float(quiet["p01"]) < -950 and 950 < float(quiet["p99"]) < 1000  # type: ignore[arg-type]
