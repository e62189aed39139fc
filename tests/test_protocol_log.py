"""pynetdicom narrates each PDU and message only when we debug (dicom_io/protocol_log.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from pynetdicom import AE, Association, _config, evt

from daemon.logs import setup_logging

_NARRATED = (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    narration = _config.LOG_HANDLER_LEVEL
    yield
    root.handlers[:], root.level = handlers, level
    _config.LOG_HANDLER_LEVEL = narration


def _bound(level: str) -> list[object]:
    setup_logging(level)
    assoc = Association(AE(), "acceptor")
    return [h for event in _NARRATED for h in assoc.get_handlers(event)]


def test_associations_carry_no_narration_below_debug() -> None:
    assert _bound("INFO") == []
    assert _bound("WARNING") == []


def test_debugging_binds_pynetdicom_narration_again() -> None:
    assert len(_bound("DEBUG")) == len(_NARRATED)
