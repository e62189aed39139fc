"""Which SOP classes and transfer syntaxes the SCP accepts."""

from __future__ import annotations

import pynetdicom.sop_class as sop_class
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import ALL_TRANSFER_SYNTAXES

# Every storage SOP class pynetdicom knows (PS3.4 Annex B): a PACS that
# auto-routes forwards whole studies, SR, SEG, PR, KO, RT and waveforms with
# the images, and refusing those fails its jobs. What is done with them is
# the receive stage's decision (scp.non_image_objects).
STORAGE_CLASSES: dict[str, str] = {
    str(uid): name for name, uid in sorted(sop_class._STORAGE_CLASSES.items())
}

# The image classes: CT, MR, CR, DX, MG, US, XA, NM, PT, SC and the enhanced
# and legacy-converted multi-frame families. Only these are analysed.
IMAGE_STORAGE_CLASSES: dict[str, str] = {
    uid: name for uid, name in STORAGE_CLASSES.items() if "Image" in name
}

# Image classes we produce ourselves (the summary image, dicom_io/summary.py):
# an object of these classes whose SOP Instance UID is in our outbox came back
# from the PACS and must not be analysed (loop guard). Our other objects (SR,
# SEG, Parametric Map, GSPS) are not image classes at all.
OWN_IMAGE_CLASSES = frozenset(
    str(uid)
    for uid in (
        sop_class.SecondaryCaptureImageStorage,
        sop_class.MultiFrameTrueColorSecondaryCaptureImageStorage,
    )
)

_UNCOMPRESSED = [
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
]

# The acceptor's order decides which of the offered syntaxes is taken
# (pynetdicom's negotiate_as_acceptor). Compressed ones first: the object is
# kept exactly as the modality compressed it. Then Explicit VR before
# Implicit: Implicit loses the VR of private elements.
TRANSFER_SYNTAXES: list[str] = [
    *(str(ts) for ts in ALL_TRANSFER_SYNTAXES if ts not in _UNCOMPRESSED),
    *(str(ts) for ts in _UNCOMPRESSED),
]


def is_image_storage(uid: str) -> bool:
    return uid in IMAGE_STORAGE_CLASSES
