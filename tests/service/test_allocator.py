"""Freed upload buffers stay in the process (``service.allocator``): a worker's next fetch of
an upload body reuses the pages of the last one instead of faulting each one in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from service.settings import Settings

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

# One process per measurement: the thresholds are process-wide and cannot be unset.  What a
# claim-check upload costs in the processes that handle it: a body received and stored (the
# API), then fetched through the bulk client in a thread, again and again (a worker).
_FAULTS = """
import os, resource, sys, threading
from service.allocator import keep_freed_memory
from service.store import bulk_client
keep_freed_memory(int(sys.argv[1]))
client = bulk_client(sys.argv[2])
client.set(sys.argv[3], memoryview(bytearray(os.urandom(16 * 2**20))), ex=60)
def fetch():
    for _ in range(3):  # warm-up
        client.get(sys.argv[3])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        client.get(sys.argv[3])
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
thread = threading.Thread(target=fetch)
thread.start()
thread.join()
"""
SIZE = 16 * 2**20


#: glibc's starting mmap threshold, pinned: left alone, glibc raises it to the size of any
#: mmap-ed block the process frees (its dynamic threshold), so whether a later 16 MiB reply is
#: served from the heap depends on the order the reply buffers happened to be freed in (measured:
#: 2 of 20 fresh processes fetched with no faults at all).  Set as a tunable, it stays put.
GLIBC_DEFAULT_THRESHOLD = "glibc.malloc.mmap_threshold=131072"


def _faults_per_fetch(keep: int, redis_url: str, key: str) -> float:
    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_DEFAULT_THRESHOLD)
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, str(keep), redis_url, key],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return float(out.stdout.strip())


def test_a_fetched_body_reuses_the_last_ones_pages(redis_url: str, key_prefix: str) -> None:
    key = f"{key_prefix}:raw"
    pages = SIZE // 4096
    # glibc's starting threshold: every fetch faults the whole body in anew (measured: 8,194
    # of 4,096 pages, the reply buffer and the value)
    assert _faults_per_fetch(0, redis_url, key) > 0.9 * pages
    assert _faults_per_fetch(Settings().malloc_keep_bytes, redis_url, key) < 0.01 * pages
