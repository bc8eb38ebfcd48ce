"""The benches' CPU peak memory (bench/common.py, bench/train_step.py's children) is the child's own: the kernel carries a parent's resident
high-water mark across execve into ru_maxrss, which made every method of the methods bench read
the bench's own 2.27 GiB."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

REPO = Path(__file__).resolve().parents[1]
PARENT_BYTES = 2 << 30


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_a_child_of_a_large_process_reports_its_own_peak():
    held = bytearray(PARENT_BYTES)
    held[::4096] = b"\x01" * len(held[::4096])  # one write per page makes the (lazily mapped) pages resident
    probe = ("import json, resource; from bench.common import peak_rss_bytes; "
             "print(json.dumps([peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    peak, inherited = json.loads(out)
    del held
    assert inherited >= PARENT_BYTES  # the kernel's carry-over that ru_maxrss shows
    # The child's own (python, torch, the bench: ~0.6-1 GiB) sits far below what it inherited.
    assert 0 < peak < inherited - PARENT_BYTES // 2
