"""The few things hetero asks of llama.cpp (llama-cpp-python, the `dev` extra): its quantizer for
test files made exactly as llama.cpp makes them, and quiet logs while it works. Nothing at run
time imports this module."""

import contextlib
import os
from pathlib import Path

from modelfile.errors import HeteroError


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp logs to the C-level stderr; hide it while it works."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quantize(source: Path, target: Path, ftype: str) -> None:
    """llama.cpp's own quantizer: its block rounding and its per-tensor type choices for `ftype`."""
    try:
        import llama_cpp
    except ImportError:
        raise HeteroError(f"writing {ftype} with llama.cpp's quantizer needs llama-cpp-python "
                          "(pip install -e '.[dev]')") from None  # fmt: skip
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = os.cpu_count() or 1
    with quiet_stderr():
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if failed:
        raise HeteroError(f"llama.cpp could not quantize {source} to {ftype}")
