"""NUMA-aware CPU kernels on GGUF blocks and the asynchronous expert executor (see docs/ARCHITECTURE.md).

Compiled kernels are cached on disk (numba `cache=True`) under a directory named by a hash of
this package's sources: numba only checks the timestamp of the file that defines a function,
and the kernels are built from IR generated in other modules (blocks.py, simd.py).
"""

import hashlib
import os
from pathlib import Path

import numba


def _cache_dir() -> Path:
    sources = b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py")))
    key = hashlib.sha256(sources + numba.__version__.encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hetero" / "numba"
    return base / key


if not os.environ.get("NUMBA_CACHE_DIR"):
    numba.config.CACHE_DIR = str(_cache_dir())
