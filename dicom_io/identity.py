"""What every DICOM object we write shares: its new series and instance, and who made it.

Each builder (the SRs, the GSPS, the parametric map, the SEGs) takes these as
keyword arguments (`**new: Unpack[NewObject]`) and hands them to highdicom
through `identity`, so the defaults and the new UIDs are decided here once.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any, Required, TypedDict

from pydicom.uid import generate_uid

try:
    SOFTWARE_VERSION = metadata.version("secondreader")
except metadata.PackageNotFoundError:  # running from a checkout that is not installed
    SOFTWARE_VERSION = "unknown"


class NewObject(TypedDict, total=False):
    """A new object's series and instance, and our equipment (all but the series number
    have a default: new UIDs, instance 1, "secondreader", this version)."""

    series_number: Required[int]
    series_instance_uid: str | None
    sop_instance_uid: str | None
    instance_number: int
    manufacturer: str
    manufacturer_model_name: str
    software_versions: str


def identity(new: NewObject) -> dict[str, Any]:
    """highdicom's constructor arguments for `new`: given UIDs, or new ones."""
    return {
        "series_instance_uid": new.get("series_instance_uid") or generate_uid(),
        "series_number": new["series_number"],
        "sop_instance_uid": new.get("sop_instance_uid") or generate_uid(),
        "instance_number": new.get("instance_number", 1),
        "manufacturer": new.get("manufacturer", "secondreader"),
        "manufacturer_model_name": new.get("manufacturer_model_name", "secondreader"),
        "software_versions": new.get("software_versions", SOFTWARE_VERSION),
    }


def station(device_serial_number: str | None) -> str:
    """The Device Serial Number (Type 1 in Enhanced General Equipment): the one
    configured, else this host's name."""
    return device_serial_number or platform.node()[:64] or "unknown"
