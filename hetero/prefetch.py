"""Read a model's weights into the page cache once, up front, reporting progress by bytes.

Weights are memory-mapped, so without this the first tokens fault pages in from disk one by
one: for a 400 GB model that is minutes of silence on the first reply. Reading them in order,
a page at a time, lets the kernel read ahead and lets the user watch a progress bar instead.
Skipped when the files would not fit in the RAM that is free, where it would only evict itself.
"""

from collections.abc import Callable

import numpy as np

from modelfile.gguf_file import GGUFModelFile
from placement.hardware import meminfo

PAGE = 4096
STEP_BYTES = 64 * 2**20  # progress granularity


def prefetch(file: GGUFModelFile, progress: Callable[[int, int], None] | None = None) -> bool:
    """Touch every page of every tensor; returns False (doing nothing) if RAM is too small."""
    total = sum(t.nbytes for t in file.tensors.values())
    if total > 0.8 * meminfo("MemAvailable"):
        return False
    done = 0
    for t in file.tensors.values():
        flat = t.data.reshape(-1)
        for start in range(0, flat.shape[0], STEP_BYTES):
            chunk = flat[start : start + STEP_BYTES]
            int(np.add.reduce(chunk[::PAGE], dtype=np.uint64))  # one byte per page: the page is read
            done += chunk.shape[0]
            if progress:
                progress(done, total)
    return True
