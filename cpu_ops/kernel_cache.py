"""Where numba keeps the compiled CPU kernels, and what happens when a cached kernel is unreadable.

The kernels are cached on disk (numba `cache=True`) under a directory named by a hash of this
package's sources and of the engine types as declared (modelfile/quants/types.py): numba only
checks the timestamp of the file that defines a function, and the kernels are built from IR
generated in other modules (blocks.py, simd.py) for the declared types in their order.

Two processes compiling at once (a server and a benchmark started together, a test and its
subprocess) would race on numba's index: each reads it, picks the same free data-file number
for its new kernel, and the last writer's index then names the other process's machine code,
so a later run multiplies Q2_K weights with another type's kernel (seen: a whole model's logits
turned to NaN). numba has no lock of its own; every cache read and write here holds one on a
file in the cache directory (shared to load, exclusive to save).

A cache file can be damaged (a full disk, a bit flip, a copy cut short). numba would then raise
from deep inside the first call of that kernel, often on a worker thread, on every later run.
Instead, a kernel whose cached files do not load has them moved to a `set-aside` folder beside
the cache, one warning line is printed (once per process), and numba compiles it again, which
writes a fresh entry.
"""

import contextlib
import fcntl
import hashlib
import inspect
import os
import sys
import threading
import time
from pathlib import Path

import numba
from numba.core import caching

from modelfile.paths import cache_home
from modelfile.quants.types import QUANT_TYPES

_LOCK = threading.Lock()
_WARNED = False


def cache_dir() -> Path:
    """This version of the kernels: a hash of cpu_ops' sources, the engine types as declared
    (their order gives the codes compiled into the kernels; a body declared outside cpu_ops
    brings its own source) and numba's version."""
    sources = b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py")))
    key = hashlib.sha256(sources + _declared_engine_types() + numba.__version__.encode()).hexdigest()[:16]
    return cache_home() / "numba" / key


def _declared_engine_types() -> bytes:
    parts = []
    for qtype, t in QUANT_TYPES.items():
        if t.engine is not None:
            body = t.engine if isinstance(t.engine, str) else inspect.getsource(t.engine)
            parts.append(f"{qtype.name}={body}")
    return "\n".join(parts).encode()


def install() -> None:
    """Point numba at our cache directory (unless NUMBA_CACHE_DIR chooses one) and guard its loads."""
    if not os.environ.get("NUMBA_CACHE_DIR"):
        numba.config.CACHE_DIR = str(cache_dir())
    if not getattr(caching.Cache.load_overload, "_hetero_guard", False):
        caching.Cache.load_overload = _guarded(caching.Cache.load_overload)
        caching.Cache.save_overload = _locked_save(caching.Cache.save_overload)


@contextlib.contextmanager
def _cache_lock(cache, exclusive: bool):
    """An inter-process lock on the directory of this kernel's cache files (none if it cannot be made)."""
    try:
        path = Path(cache._cache_file._index_path).parent / ".lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only cache: numba cannot write it either
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _locked_save(save_overload):
    def save_locked(cache, sig, data):
        with _cache_lock(cache, exclusive=True):
            return save_overload(cache, sig, data)

    return save_locked


def _guarded(load_overload):
    def load_or_set_aside(cache, sig, target_context):
        try:
            with _cache_lock(cache, exclusive=False):
                return load_overload(cache, sig, target_context)
        except Exception as e:  # unpickling, a truncated file, an object file that does not link
            with _LOCK:
                try:
                    aside = f"moved the unreadable files to {_set_aside(cache._cache_file)}"
                except OSError as why:  # a read-only cache: compile anyway, this run only
                    aside = f"could not move them aside ({why.strerror or why})"
                _warn_once(cache, e, aside)
            return None  # numba compiles the kernel again and saves a fresh entry

    load_or_set_aside._hetero_guard = True
    return load_or_set_aside


def _set_aside(cache_file) -> Path:
    """Move one kernel's index and data files (name.nbi, name.N.nbc) out of numba's way."""
    index = Path(cache_file._index_path)
    aside = index.parent.parent / "set-aside" / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    stem = index.name[: -len(".nbi")]
    for path in index.parent.glob(f"{stem}.*"):
        if path.suffix in (".nbi", ".nbc"):
            os.replace(path, aside / path.name)
    return aside


def _warn_once(cache, error: Exception, aside: str) -> None:
    global _WARNED
    if _WARNED:
        return
    _WARNED = True
    reason = " ".join(str(error).split())[:120] or type(error).__name__
    name = Path(cache._cache_file._index_path).name.split("-")[0]
    sys.stderr.write(
        f"warning: the compiled-kernel cache did not load ({name}: {type(error).__name__}: {reason}); "
        f"{aside}; compiling again\n"
    )
    sys.stderr.flush()
