"""Keep freed memory in the process for reuse (glibc malloc settings); the `minippo` command calls it
when its `fast` setting is on.

A PPO step on a CPU allocates and frees the same large blocks again and again: activations of a few MB
per layer and the logits over the vocabulary. With glibc's defaults a block that large is served by `mmap`
and unmapped when freed, or the heap top is trimmed back to the system, so every step page-faults its
memory in anew (the kernel zeroes each page first). `retain_freed_memory` makes malloc serve blocks up to
1 GiB from the heap, keep up to 2 GiB of free heap top and grow it 512 MiB at a time (`mallopt`; see
`man 3 mallopt`): the same numbers, faster, at a somewhat higher peak RSS (benchmarks/RESULTS.md, "Freed
memory kept for reuse"). Library users may call it too. $MINIPPO_KEEP_FREED_MEMORY=0 keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

ENV = "MINIPPO_KEEP_FREED_MEMORY"
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt's parameters (malloc.h)


def retain_freed_memory() -> bool:
    """Set glibc malloc to keep freed memory for reuse (module docstring); True when it did.  False (and
    nothing changed) off Linux, without glibc, or with $MINIPPO_KEEP_FREED_MEMORY=0."""
    setting = os.environ.get(ENV, "")
    if setting not in ("", "0", "1"):
        raise ValueError(
            f"{ENV}={setting!r}: set it to 0 (glibc's defaults), 1 (keep freed memory) or unset it"
        )
    if setting == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl): leave it alone
        return False
    # The largest block served from the heap first: 1 GiB, or 32 MiB where an older glibc caps it. Without
    # it a fixed trim threshold would also fix glibc's mmap threshold at 128 KiB (a slower setting).
    if not any(mallopt(M_MMAP_THRESHOLD, size) == 1 for size in (2**30, 2**25)):
        return False
    # The free heap top kept (`int` arguments: at most 2 GiB - 1) and the extra heap asked for at each growth.
    done = mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1 and mallopt(M_TOP_PAD, 2**29) == 1
    logger.debug("malloc: freed memory kept for reuse (%s)", "set" if done else "refused")
    return done
