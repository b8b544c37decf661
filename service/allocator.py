"""Keep freed upload buffers in the process for the next upload: glibc's malloc thresholds.

Every upload allocates buffers the size of its body and frees them moments later: the API's
read buffer and uvicorn's chunk copies, a worker's reply to ``GET raw:<upload>``.  With glibc's
defaults a block that large is usually a fresh ``mmap`` (glibc's dynamic threshold starts at
128 KiB and rises only to the size of an mmap-ed block freed earlier, so now and then a process
happens to keep one), given back with ``munmap`` when freed, so each upload faults every 4 KiB
page of its body in again and has the kernel zero it: one minor fault per page, 4,096 per 16
MiB upload (``/proc/<pid>/stat``, ``bench/service.py``), about a third of a worker's CPU time
per upload on the claim-check path.  Serving blocks up to
:data:`MMAP_THRESHOLD_MAX` from the heap, and trimming the heap only past ``keep`` bytes of
free memory, makes the next upload reuse the pages of the last one instead.

``mallopt`` is glibc's own interface (``man 3 mallopt``; the same knobs as the
``GLIBC_TUNABLES`` ``glibc.malloc.mmap_threshold`` and ``trim_threshold``), called through
``ctypes`` because nothing in the standard library exposes it.  Elsewhere (musl, macOS) this
is a no-op.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

#: mallopt parameter numbers (glibc ``malloc.h``)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc refuses a larger mmap threshold on 64-bit (``HEAP_MAX_SIZE / 2``): bodies above it
#: stay ``mmap``-ed
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def keep_freed_memory(keep: int) -> bool:
    """Let this process keep up to ``keep`` bytes of freed memory for reuse (0: glibc's
    defaults, nothing changed).  Returns True where the thresholds were set (glibc).

    The process's resident size then stays near its peak after a burst of uploads, by at most
    ``keep`` bytes, instead of falling back between uploads.
    """
    if keep <= 0 or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX))
    ok = bool(mallopt(M_TRIM_THRESHOLD, min(keep, 2**31 - 1))) and ok
    if not ok:
        log.warning("glibc refused the malloc thresholds; uploads fault their pages in anew")
    return ok
