"""minippo.fast.allocator: freed memory kept for reuse, seen as page faults in a fresh process."""

import subprocess
import sys
from pathlib import Path

import pytest

from minippo.fast import allocator

REPO = Path(__file__).resolve().parents[2]

# Allocate, touch and free a 256 MiB block eight times; print the minor page faults of the last seven.
PROBE = """
import resource, sys
import torch
from minippo.fast.allocator import retain_freed_memory
print(retain_freed_memory())
torch.ones(2**26).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(7):
    torch.ones(2**26).sum()  # 256 MiB of float32, written then freed
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run_probe(setting: str) -> tuple[str, int]:
    env = {"MINIPPO_KEEP_FREED_MEMORY": setting, "OMP_NUM_THREADS": "1", "PATH": ""}
    env["PYTHONPATH"] = str(REPO)  # this checkout's minippo
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    did, faults = out.stdout.split()
    return did, int(faults)


@pytest.mark.machine
@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only"
)
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    """With the settings a freed 256 MiB block is reused: almost no page faults after the first; with
    glibc's defaults ($MINIPPO_KEEP_FREED_MEMORY=0) each of the seven blocks faults its 65,536 pages in."""
    kept, kept_faults = run_probe("1")
    default, default_faults = run_probe("0")
    assert (kept, default) == ("True", "False")
    assert default_faults > 7 * 2**16 * 0.9  # every page of every block, anew
    assert kept_faults < 2**16 / 10


def test_a_bad_setting_is_refused(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "yes")
    with pytest.raises(
        ValueError, match=r"MINIPPO_KEEP_FREED_MEMORY='yes': set it to 0 .*, 1 .* or unset it"
    ):
        allocator.retain_freed_memory()
