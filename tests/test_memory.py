"""The worker's heap release: freed host memory really goes back to the system."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# In a fresh interpreter: ~400 MB of heap-sized blocks (below glibc's mmap threshold), all
# freed but the last, which pins the heap's top so glibc cannot shrink it on its own.
_PROGRAM = """
from handler.memory import release_free_heap

def rss_mib():
    status = open("/proc/self/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024

blocks = [bytes(4000) + bytes([i % 256]) for i in range(100_000)]
last = blocks[-1]
del blocks
held = rss_mib()
released = release_free_heap()
print(held, rss_mib(), released)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_returns_freed_heap_to_the_system():
    result = subprocess.run(
        [sys.executable, "-c", _PROGRAM], cwd=REPO, capture_output=True, text=True, check=True
    )
    held, after, released = result.stdout.split()
    assert released == "True"
    assert int(held) - int(after) > 300, result.stdout  # MiB given back
