"""release_freed_host_memory (set by the commands on CPU-only hosts): freed tensors go back to
the system instead of staying resident in glibc's heap."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.unit

SCRIPT = textwrap.dedent("""
    import sys, torch
    from ringpatch.parallel.process import release_freed_host_memory
    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    if sys.argv[1] == "release":
        assert release_freed_host_memory()
    x = torch.ones(2**21)  # 8 MiB, mapped; freeing it raises glibc's own threshold to 8 MiB
    del x
    base = rss_mib()
    blocks, keep = [], []
    for _ in range(100):  # 4 MiB tensors, each followed by a small one that stays
        blocks.append(torch.ones(2**20))
        keep.append(torch.ones(4000))  # 16 KB: carved from the heap right after the block
    del blocks
    print(round(rss_mib() - base))
""")


def _resident_after_free(mode: str, env=None) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_freed_tensors_leave_the_resident_set():
    assert _resident_after_free("default") >= 300  # glibc's defaults keep the freed 400 MiB
    assert _resident_after_free("release") <= 20


def test_a_users_own_threshold_is_kept(monkeypatch):
    from ringpatch.parallel.process import release_freed_host_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert release_freed_host_memory() is False
