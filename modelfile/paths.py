"""Where hetero keeps what it makes once and reuses: the demo model, compiled kernels, the
machine's measured bandwidth. $XDG_CACHE_HOME/hetero, else ~/.cache/hetero."""

import os
from pathlib import Path


def cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hetero"
