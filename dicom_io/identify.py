"""Read the few identifying attributes of a received object, not the whole of it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Literal

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.tag import Tag

from dicom_io import status

# Digits and dots only: a UID that passes can be used as a path component.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

_TAGS = [
    Tag("SOPClassUID"),
    Tag("SOPInstanceUID"),
    Tag("StudyInstanceUID"),
    Tag("SeriesInstanceUID"),
    Tag("Modality"),
]


class InvalidDataset(ValueError):
    """The object cannot be stored; `status` is the C-STORE failure status to send."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# C-STORE failure statuses (PS3.4 Annex B.2.3), named in dicom_io/status.py.
STATUS_OUT_OF_RESOURCES = status.OUT_OF_RESOURCES
STATUS_DATASET_MISMATCH = status.DATASET_MISMATCH
STATUS_CANNOT_UNDERSTAND = status.CANNOT_UNDERSTAND


def valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and _UID.match(value) is not None


@dataclass(frozen=True)
class Identity:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None


def read_transfer_syntax(path: Path) -> str:
    """The transfer syntax of a stored Part 10 file, from its file meta only."""
    return str(read_file_meta_info(path).TransferSyntaxUID)


def identify(encoded: bytes) -> Identity:
    """Parse the UIDs from a DICOM file's bytes, stopping before pixel data.

    Only the header is parsed, and only five attributes are kept; a truncated
    or non-DICOM stream raises InvalidDataset with "cannot understand".
    """
    try:
        ds = dcmread(BytesIO(encoded), stop_before_pixels=True, specific_tags=_TAGS)
        values = {
            "sop_class_uid": str(ds.get("SOPClassUID", "") or ""),
            "sop_instance_uid": str(ds.get("SOPInstanceUID", "") or ""),
            "study_instance_uid": str(ds.get("StudyInstanceUID", "") or ""),
            "series_instance_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        }
        modality = str(ds.get("Modality", "") or "") or None
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        # The exception's text may quote values: only its type is kept.
        raise InvalidDataset(
            f"cannot parse dataset ({type(exc).__name__})", STATUS_CANNOT_UNDERSTAND
        ) from exc
    except Exception as exc:
        # Anything else pydicom raises on a hostile stream (RecursionError,
        # NotImplementedError for an unknown VR...) is still "cannot understand":
        # never "out of resources", which tells the sender to try again.
        raise InvalidDataset(
            f"cannot parse dataset ({type(exc).__name__})", STATUS_CANNOT_UNDERSTAND
        ) from exc
    _check_uids(values)
    return Identity(modality=modality, **values)


# Every VR of PS3.5 6.2; an explicit VR outside it cannot be parsed (and would
# break a later stage that reads the whole header).
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM "
    b"UC UI UL UN UR US UT UV".split()
)
# Sequences nested deeper than this are refused: no real object comes close,
# and a parser that recurses per level can be made to exhaust its stack.
MAX_SEQUENCE_DEPTH = 32

_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _Truncated(Exception):
    pass


class _Malformed(Exception):
    pass


class _Walker:
    """Walks element headers to the end of a dataset without decoding values.

    pydicom reads a short stream without complaint (the last value just comes
    back short), so the receive path checks the framing itself.
    """

    def __init__(
        self, data: bytes, implicit: bool, little: bool, keep: frozenset[int] = frozenset()
    ) -> None:
        self.data, self.implicit = data, implicit
        self.order: Literal["little", "big"] = "little" if little else "big"
        # Top-level elements whose raw values are kept on the way (`kept`).
        self.keep = keep
        self.kept: dict[int, bytes] = {}

    def _u(self, pos: int, size: int) -> int:
        if pos + size > len(self.data):
            raise _Truncated(f"element header cut short at byte {pos}")
        return int.from_bytes(self.data[pos : pos + size], self.order)

    def _tag(self, pos: int) -> int:
        return (self._u(pos, 2) << 16) | self._u(pos + 2, 2)

    def elements(self, pos: int, end: int | None, implicit: bool, depth: int = 0) -> int:
        """Parse elements from pos to end (or to an item delimiter); return the end."""
        if depth > MAX_SEQUENCE_DEPTH:
            raise _Malformed(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
        while end is None or pos < end:
            if end is None and pos >= len(self.data):
                raise _Truncated("item ends without its delimiter")
            tag = self._tag(pos)
            if tag == _ITEM_END:
                return pos + 8
            vr = b""
            if implicit:
                length, pos = self._u(pos + 4, 4), pos + 8
            else:
                vr = self.data[pos + 4 : pos + 6]
                if vr not in _VRS and len(vr) == 2:
                    raise _Malformed(f"unknown VR at ({tag >> 16:04X},{tag & 0xFFFF:04X})")
                if vr in _LONG_VRS:
                    length, pos = self._u(pos + 8, 4), pos + 12
                else:
                    length, pos = self._u(pos + 6, 2), pos + 8
            if length == _UNDEFINED:
                if tag == 0x7FE00010:
                    pos = self.items(pos, fragments=True, implicit=implicit, depth=depth)
                else:
                    # An undefined-length UN holds implicit little endian (PS3.5 6.2.2).
                    pos = self.items(
                        pos, fragments=False, implicit=implicit or vr == b"UN", depth=depth
                    )
            else:
                if pos + length > len(self.data):
                    raise _Truncated(f"value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) is cut short")
                if vr == b"SQ":
                    self.defined_items(pos, pos + length, implicit, depth)
                elif depth == 0 and tag in self.keep:
                    self.kept[tag] = self.data[pos : pos + length]
                pos += length
        return pos

    def defined_items(self, pos: int, end: int, implicit: bool, depth: int) -> None:
        """The items of a sequence of defined length, from pos to end."""
        while pos < end:
            tag, length = self._tag(pos), self._u(pos + 4, 4)
            pos += 8
            if tag != _ITEM:
                raise _Malformed(f"expected an item at byte {pos - 8}")
            if length == _UNDEFINED:
                pos = self.elements(pos, None, implicit, depth + 1)
            else:
                if pos + length > end:
                    raise _Truncated("item value cut short")
                self.elements(pos, pos + length, implicit, depth + 1)
                pos += length

    def items(self, pos: int, *, fragments: bool, implicit: bool, depth: int) -> int:
        while True:
            tag, length = self._tag(pos), self._u(pos + 4, 4)
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM:
                raise _Truncated(f"expected an item at byte {pos - 8}")
            if length == _UNDEFINED and not fragments:
                pos = self.elements(pos, None, implicit, depth + 1)
            elif not fragments and length:
                # A defined-length item is parsed too: its elements can be as
                # malformed as any other.
                end = pos + length
                if end > len(self.data):
                    raise _Truncated("item value cut short")
                pos = self.elements(pos, end, implicit, depth + 1)
            else:
                pos += length
                if pos > len(self.data):
                    raise _Truncated("item value cut short")


_DEFLATED = "1.2.840.10008.1.2.1.99"
# The attributes `Identity` holds, by tag: (0008,0016), (0008,0018),
# (0020,000D), (0020,000E) and (0008,0060).
_IDENTITY_TAGS = {
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x0020000D: "study_instance_uid",
    0x0020000E: "series_instance_uid",
    0x00080060: "modality",
}


def _walk(dataset: bytes, transfer_syntax_uid: str, keep: frozenset[int]) -> dict[int, bytes]:
    implicit = transfer_syntax_uid == "1.2.840.10008.1.2"
    little = transfer_syntax_uid != "1.2.840.10008.1.2.2"
    walker = _Walker(dataset, implicit, little, keep)
    try:
        walker.elements(0, len(dataset), implicit)
    except _Truncated as exc:
        raise InvalidDataset(f"dataset is truncated: {exc}", STATUS_CANNOT_UNDERSTAND) from exc
    except _Malformed as exc:
        raise InvalidDataset(f"dataset is malformed: {exc}", STATUS_CANNOT_UNDERSTAND) from exc
    return walker.kept


def identify_received(dataset: bytes, transfer_syntax_uid: str, file_bytes: bytes) -> Identity:
    """Refuse a dataset (without file meta) whose framing runs past its end,
    and read its identity on the same pass.

    The receive path's hot spot: the framing walk keeps the five values on
    its way, so the dataset is not parsed a second time by pydicom. A
    deflated dataset has to be inflated: pydicom reads that one (its
    inflate reports a cut stream itself).
    """
    if transfer_syntax_uid == _DEFLATED:
        return identify(file_bytes)
    kept = _walk(dataset, transfer_syntax_uid, frozenset(_IDENTITY_TAGS))
    # UI pads with NUL, CS with a space (PS3.5 6.2); values are ASCII.
    text = {
        name: kept.get(tag, b"").decode("latin-1").strip("\0 ")
        for tag, name in _IDENTITY_TAGS.items()
    }
    modality = text.pop("modality") or None
    _check_uids(text)
    return Identity(modality=modality, **text)


def _check_uids(values: dict[str, str]) -> None:
    for key, value in values.items():
        if not value:
            raise InvalidDataset(f"{key} missing", STATUS_DATASET_MISMATCH)
        if not valid_uid(value):
            # Never echo the value into logs unchecked: it is attacker-controlled.
            raise InvalidDataset(f"{key} is not a valid UID", STATUS_DATASET_MISMATCH)
