"""The log under stress: readable where it is safe, silent about patients, never empty.

The PHI test (tests/test_phi.py) proves no patient value reaches the log of a
real daemon; these prove the scrubber does not hide what an administrator
needs (issue "Hostile peers, second round"), and that repeated lines fold.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator

import pytest

from daemon.logs import setup_logging
from dicom_io.text import scrub_values


@pytest.fixture
def log_lines() -> Iterator[Callable[[], list[str]]]:
    """The daemon's log handler, its stream a buffer: the lines it writes."""
    setup_logging("INFO")
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler)
    buffer = io.StringIO()
    handler.setStream(buffer)

    def lines() -> list[str]:
        return buffer.getvalue().splitlines()

    yield lines
    logging.getLogger().handlers[:] = []


def test_paths_job_names_and_refused_titles_stay_readable() -> None:
    assert scrub_values('File "/opt/secondreader/daemon/receiver.py", line 3') == (
        'File "/opt/secondreader/daemon/receiver.py", line 3'
    )
    job = 'job "seal-audit (trigger: interval[0:00:05], next run at: 2026-12-05 07:34:49 UTC)"'
    assert scrub_values(f"Execution of {job} skipped") == f"Execution of {job} skipped"
    assert scrub_values("called AE title [SOMEONEELSE] is not ours") == (
        "called AE title [SOMEONEELSE] is not ours"
    )


@pytest.mark.parametrize(
    "patient_value",
    ["1923-04-19", "DOE^JOHN", "/import/DOE^JOHN/1.dcm", "Doe John", "PID-004711"],
)
def test_patient_values_are_still_hidden(patient_value: str) -> None:
    scrubbed = scrub_values(f"Unable to convert '{patient_value}' to 'DA'")
    assert patient_value not in scrubbed
    assert scrubbed == "Unable to convert '<value>' to 'DA'"


def test_a_traceback_keeps_its_paths(log_lines: Callable[[], list[str]]) -> None:
    try:
        raise ValueError("Invalid value 'DOE^JOHN'")
    except ValueError:
        logging.getLogger("daemon.test").exception("store failed")
    text = "\n".join(log_lines())
    assert "DOE^JOHN" not in text
    assert f'File "{__file__}"' in text


def test_no_empty_error_line(log_lines: Callable[[], list[str]]) -> None:
    library = logging.getLogger("pynetdicom.dul")
    library.error("")  # nothing to say: dropped
    try:
        raise ConnectionResetError()
    except ConnectionResetError as exc:
        library.exception(exc)  # as pynetdicom logs an exception: its text, here none
    lines = log_lines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "ERROR pynetdicom.dul: ConnectionResetError (no message)"
    ]


def test_apscheduler_repeats_fold(log_lines: Callable[[], list[str]]) -> None:
    scheduler = logging.getLogger("apscheduler.scheduler")
    for _ in range(50):
        scheduler.warning(
            'Execution of job "%s" skipped: maximum number of running instances reached (%d)',
            "complete-studies (trigger: interval[0:00:00.500000], next run at: 2026-12-05)",
            1,
        )
    lines = log_lines()
    assert len(lines) == 1
    assert 'job "complete-studies (trigger: interval[0:00:00.500000]' in lines[0]
