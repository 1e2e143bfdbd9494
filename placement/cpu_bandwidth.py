"""The machine's CPU read bandwidth: measured once with one method, cached with its date.

`plan`, `demo`, `bench` and the library's default plan all predict from this one figure, so
their predictions agree and each can say where the number came from. The cache is keyed by
what would change the answer: the CPU model, the CPUs this process may use, NUMA nodes, RAM
and the probe's method. Anything else in the cache file (another machine's entry, a damaged
file) means measuring again; `--cpu-bw` replaces the figure for one command.
"""

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from modelfile.paths import cache_home

VERSION = 2  # the probe's method; bump when it changes (1 was a float sum, core-bound)


@dataclass(frozen=True)
class Measured:
    bytes_per_s: float
    method: str
    date: str  # ISO date of the measurement

    def describe(self) -> str:
        return f"CPU bandwidth measured {self.date} ({self.method})"


def cached_cpu_bandwidth(ram: int, numa_nodes: int, measure=None) -> Measured:
    """This machine's figure (ram bytes, numa_nodes as detected) from the cache, or measured now
    and cached. measure() -> (bytes/s, method)."""
    path = cache_home() / "cpu-bandwidth.json"
    key = machine_key(ram, numa_nodes)
    try:
        entry = json.loads(path.read_text())
        if entry.get("machine") == key and entry.get("version") == VERSION and entry["bytes_per_s"] > 0:
            return Measured(float(entry["bytes_per_s"]), str(entry["method"]), str(entry["date"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # none yet, another machine's, or unreadable: measure again
    if measure is None:
        from cpu_ops.bandwidth import read_bandwidth as measure
    rate, method = measure()
    result = Measured(rate, method, time.strftime("%Y-%m-%d"))
    entry = {"version": VERSION, "machine": key, "bytes_per_s": rate, "method": method, "date": result.date}
    _write_atomically(path, json.dumps(entry, indent=1))
    return result


def machine_key(ram: int, numa_nodes: int) -> dict:
    """What the figure depends on: CPU model, usable CPUs, NUMA nodes, RAM (GiB)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"cpu": model, "cpus": cpus, "numa_nodes": numa_nodes, "ram_gib": round(ram / 2**30)}


def _write_atomically(path: Path, text: str) -> None:
    """A reader sees the old file or the new one, never half of one; a failure to write only
    means measuring again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        pass
