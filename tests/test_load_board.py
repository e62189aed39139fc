"""Which receiving process accepts the next association (dicom_io/guard.LoadBoard)."""

from __future__ import annotations

import multiprocessing

from dicom_io.guard import UNAVAILABLE, LoadBoard


def test_a_busier_process_leaves_the_next_connection_to_a_less_busy_one() -> None:
    counts = multiprocessing.get_context("spawn").RawArray("q", 3)
    serve, first, second = (LoadBoard(counts, i) for i in range(3))
    # Nobody holds a connection: nobody waits, whoever accepts first takes it.
    assert not any(b.others_less_busy() for b in (serve, first, second))
    serve.set(1)
    assert serve.others_less_busy() and not first.others_less_busy()
    first.set(1)
    second.set(1)
    # All equal again: nobody defers.
    assert not any(b.others_less_busy() for b in (serve, first, second))


def test_a_process_not_listening_is_never_waited_for() -> None:
    counts = multiprocessing.get_context("spawn").RawArray("q", 2)
    serve, child = LoadBoard(counts, 0), LoadBoard(counts, 1)
    counts[1] = UNAVAILABLE  # as ReceiverPool marks a child until it listens, or once dead
    serve.set(5)
    assert not serve.others_less_busy()
    child.set(0)  # it listens now
    assert serve.others_less_busy()


def test_others_busy_tells_a_receiving_process_it_is_not_alone() -> None:
    """A store overlaps its fsync with the database only when no other process receives."""
    counts = multiprocessing.get_context("spawn").RawArray("q", 3)
    serve, child, starting = (LoadBoard(counts, i) for i in range(3))
    counts[2] = UNAVAILABLE  # not listening yet: holds nothing
    serve.set(1)
    assert not serve.others_busy()
    child.set(2)
    assert serve.others_busy() and child.others_busy()
    child.set(0)
    assert not serve.others_busy() and child.others_busy()
