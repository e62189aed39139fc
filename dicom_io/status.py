"""DIMSE statuses by name, and in words, from `pynetdicom.status`.

pynetdicom names the statuses every service shares (`Status.SUCCESS`,
`Status.PENDING`, `Status.CANCEL`) and gives the words of every code, service
by service, in its tables (`GENERAL_STATUS`, `STORAGE_SERVICE_CLASS_STATUS`).
The codes we answer or look for that it has no constant for are named here
once, each with the words its tables give; the rest of the code uses these
names, never the numbers.
"""

from __future__ import annotations

from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, Status

SUCCESS = int(Status.SUCCESS)
PENDING = int(Status.PENDING)
# C-FIND (QR_FIND_SERVICE_CLASS_STATUS): "Matches are continuing - Warning that one or
# more Optional Keys were not supported".
PENDING_WITH_WARNING = 0xFF01

# General statuses (PS3.7 C; GENERAL_STATUS).
INVALID_ATTRIBUTE_VALUE = 0x0106  # "Invalid Attribute Value"
PROCESSING_FAILURE = 0x0110  # "Processing Failure"
INVALID_ARGUMENT_VALUE = 0x0115  # "Invalid Argument Value"
NO_SUCH_SOP_CLASS = 0x0118  # "No Such SOP Class"
DUPLICATE_SOP_INSTANCE = 0x0111  # "Duplication SOP Instance"
NO_SUCH_SOP_INSTANCE = 0x0112  # "No Such SOP Instance"
CLASS_INSTANCE_CONFLICT = 0x0119  # "Class-Instance Conflict"
SOP_CLASS_NOT_SUPPORTED = 0x0122  # "Refused: SOP Class Not Supported"
DUPLICATE_TRANSACTION_UID = 0x0131  # storage commitment Failure Reason (PS3.3 C.14.1.1)
RESOURCE_LIMITATION = 0x0213  # "Resource Limitation"

# Storage (PS3.4 B.2.3; STORAGE_SERVICE_CLASS_STATUS): the first code of each range.
OUT_OF_RESOURCES = 0xA700  # "Refused: Out of Resources" (A7xx)
DATASET_MISMATCH = 0xA900  # "Data Set Does Not Match SOP Class" (A9xx)
CANNOT_UNDERSTAND = 0xC000  # "Cannot Understand" (Cxxx); C-FIND/C-MOVE: unable to process
# Warnings: stored all the same, with coercion, discarded elements or a mismatch.
COERCION_OF_DATA_ELEMENTS = 0xB000
STORAGE_WARNING_LAST = 0xB007  # "Data Set Does Not Match SOP Class" (warning)

# MPPS (PS3.4 F.7.2): the step is COMPLETED or DISCONTINUED already.
NO_LONGER_UPDATABLE = 0xA710


def status_words(status: int) -> str | None:
    """pynetdicom's words for a C-STORE (or general) status, None for an unknown code."""
    entry = STORAGE_SERVICE_CLASS_STATUS.get(status) or GENERAL_STATUS.get(status)
    return entry[1] or None if entry is not None else None
