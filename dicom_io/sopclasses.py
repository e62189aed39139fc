"""Which SOP classes and transfer syntaxes the SCP accepts."""

from __future__ import annotations

import pynetdicom.sop_class as sop_class
from pynetdicom import ALL_TRANSFER_SYNTAXES

# Every image storage class pynetdicom knows: CT, MR, CR, DX, MG, US, XA, NM,
# PT, SC and the enhanced and legacy-converted multi-frame families. Non-image
# objects (SR, PDF, waveforms, RT) are refused at association negotiation:
# there is nothing for an image model to read in them.
IMAGE_STORAGE_CLASSES: dict[str, str] = {
    str(getattr(sop_class, name)): name
    for name in sorted(dir(sop_class))
    if name.endswith("Storage") and "Image" in name
}

# Accepted and stored as they arrive, compressed ones included: the receive
# path never decodes pixel data.
TRANSFER_SYNTAXES: list[str] = list(ALL_TRANSFER_SYNTAXES)


def is_image_storage(uid: str) -> bool:
    return uid in IMAGE_STORAGE_CLASSES
