"""Process-wide performance settings for CPU training (call once at start, e.g. from the CLI).

:func:`tune_malloc` stops glibc from serving large blocks with fresh ``mmap`` pages.

Why: glibc's malloc hands every block above ``M_MMAP_THRESHOLD`` (at most 32 MiB, however it is set)
to ``mmap`` and gives it back with ``munmap`` when freed. A training step on CPU allocates and frees
several [batch, n_latents] temporaries (75 MB at 4096 x 4608 float32) per step, so each one arrives
as untouched pages and pays a page fault per 4 KiB on first write: measured on a 2-core EPYC,
``torch.relu`` of a [4096, 4608] tensor takes 20-130 ms into a fresh block versus 3.8 ms into a reused
one, and ``torch.mm`` producing that shape 130-160 ms versus 108 ms. With ``M_MMAP_MAX = 0`` every
block comes from the heap, and with a high ``M_TRIM_THRESHOLD`` freed memory stays there, so the
next step reuses warm pages (see benchmarks/README.md).

Cost: the process keeps its peak heap (freed memory is reused, not returned to the system). Only
glibc (Linux) is affected; elsewhere the call does nothing and returns False. The equivalent
environment setting, before Python starts, is
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_TRIM = 2**31 - 1

_done: bool | None = None


def tune_malloc() -> bool:
    """Serve large allocations from glibc's reused heap instead of fresh mmap pages.

    Idempotent; returns whether the settings are in effect (False off glibc).
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, _TRIM) == 1
    log.debug("glibc malloc tuned (mmap_max=0, trim_threshold=%d): %s", _TRIM, ok)
    _done = ok
    return ok
