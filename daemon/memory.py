"""Memory a worker keeps between studies: glibc's allocator told not to give it back.

glibc serves every block over 32 MB (a 300-slice volume is 315 MB, and it is
made twice: numpy, then SimpleITK) from a fresh mapping, and returns it on
free; so does every block a thread other than the main one asks for beyond
its own 64 MB arena. Each new page then costs a page fault on first touch.
Here those faults made building one volume take from 0.3 s to 1.7 s, by
chance (bench/e2e.py): the largest and least steady part of the time from
the last image to the result. With one arena for all threads, mappings off
and trimming raised, freed memory stays in the heap, already touched, and
the same volume takes 0.04 s.

Two parts, both glibc only (elsewhere nothing changes):

- `exec_with_tunables`: the arena limit must hold before any thread has
  allocated, which only the environment at start guarantees (numpy's BLAS
  threads start at import). `serve` (with its worker) and `worker` re-run
  themselves once, same process id, with GLIBC_TUNABLES set.
- `keep_freed_memory`: the same settings through mallopt (for a process
  started with them already, a no-op), and `reserve_mb` touched now, so
  that the first study after a start is served warm too.

The process keeps the largest footprint it ever had: `worker.keep_memory_mb`
0 turns all of this off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h) and the same as tunables.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM = 2**31 - 1  # an int: the heap is trimmed past 2 GB of free memory at its top only
TUNABLES = f"glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={_TRIM}"
_MARK = "SECONDREADER_MALLOC_TUNED"


def _glibc() -> ctypes.CDLL | None:
    try:
        if "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or "").lower():
            return None
        name = ctypes.util.find_library("c")
        return ctypes.CDLL(name) if name else None
    except (OSError, ValueError):
        return None


def exec_with_tunables() -> None:
    """Re-run this command with the allocator's tunables set; returns only if it cannot.

    Once per start: the new image finds the mark in its environment.
    """
    if os.environ.get(_MARK) or _glibc() is None:
        return
    env = dict(os.environ)
    env[_MARK] = "1"
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), TUNABLES]))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as exc:  # not fatal: only slower
        log.warning("allocator settings not applied (%s): volumes may build slower", exc)


def keep_freed_memory(reserve_mb: int) -> bool:
    """Keep freed memory for reuse and touch `reserve_mb` of it now; False if not glibc."""
    libc = _glibc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    if not (
        mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _TRIM)
    ):
        return False
    if reserve_mb > 0:
        import numpy as np

        reserve = np.empty(reserve_mb * 2**20, dtype=np.uint8)
        reserve[::4096] = 0  # one write per page: each one faulted in once, here
        del reserve
    log.debug("freed memory kept for reuse (%d MB touched ahead)", reserve_mb)
    return True
