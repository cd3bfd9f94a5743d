"""orchestration.allocator: freed large tensors are reused without page faults (counted, not timed)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A training-step-like pattern: allocate, touch and free a 64 MB and a 32 MB tensor, 20 times; prints the page
# faults of the last 5 rounds (the heap has reached its steady state by then).
PROBE = """
import resource, torch
from orchestration.allocator import keep_freed_memory
print(keep_freed_memory())
for step in range(20):
    if step == 15:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x, y = torch.ones(16 * 2**20), torch.ones(8 * 2**20)
    del x, y
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run_probe(opt_out: bool) -> tuple[str, int]:
    env = {**os.environ, "PYTHONPATH": ROOT, "MEMTRAIN_KEEP_FREED_MEMORY": "0" if opt_out else "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_tensors_are_reused_without_page_faults():
    applied, faults = run_probe(opt_out=False)
    assert applied == "True"
    assert faults < 2_000  # the same heap blocks every round
    applied, faults = run_probe(opt_out=True)
    assert applied == "False"
    assert faults > 5 * 24_000  # a fresh mmap every time: one fault per 4 KB page (96 MB = 24,576 pages)
