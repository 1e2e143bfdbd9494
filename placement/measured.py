"""The machine's measured figures: each measured once with one method, cached with its date.

`plan`, `demo`, `bench` and the library's default plan all predict from the same figures, so
their predictions agree and each can say where a number came from. Three are measured:

- the CPU's read bandwidth (cpu_ops.bandwidth), which decode is bound by;
- the CPU engine's int8 multiply-adds per second on a prompt's tile of tokens
  (cpu_ops.bandwidth.prefill_macs), which a prompt's experts on the CPU are bound by;
- the host-to-GPU copy rate through pinned staging (gpu_ops.staging.staging_bandwidth), which
  a prompt's experts streamed to the GPU are bound by (CUDA only).

Each cache file is keyed by what would change its answer: the CPU model, the CPUs this process
may use, NUMA nodes, RAM, the GPU's name where it matters, and the probe's method version.
Anything else in the file (another machine's entry, a damaged file) means measuring again;
the plan's flags (--cpu-bw, --pcie-bw) replace a figure for one command.
"""

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelfile.paths import cache_home

CPU_BANDWIDTH_VERSION = 2  # the probe's method; bump when it changes (1 was a float sum, core-bound)
PREFILL_MACS_VERSION = 1
STAGING_VERSION = 1


@dataclass(frozen=True)
class Measured:
    value: float  # bytes/s or multiply-adds/s, as the figure's name says
    method: str
    date: str  # ISO date of the measurement

    @property
    def bytes_per_s(self) -> float:
        return self.value

    def describe(self, what: str = "CPU bandwidth") -> str:
        return f"{what} measured {self.date} ({self.method})"


def cached(name: str, version: int, key: dict, measure: Callable[[], tuple[float, str]]) -> Measured:
    """The figure `name` for the machine `key` from the cache, or measure() -> (value, method)
    now, cached in <cache>/hetero/<name>.json."""
    path = cache_home() / f"{name}.json"
    try:
        entry = json.loads(path.read_text())
        if entry.get("machine") == key and entry.get("version") == version and entry["value"] > 0:
            return Measured(float(entry["value"]), str(entry["method"]), str(entry["date"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # none yet, another machine's, or unreadable: measure again
    value, method = measure()
    result = Measured(value, method, time.strftime("%Y-%m-%d"))
    entry = {"version": version, "machine": key, "value": value, "method": method, "date": result.date}
    _write_atomically(path, json.dumps(entry, indent=1))
    return result


def cached_cpu_bandwidth(ram: int, numa_nodes: int, measure=None) -> Measured:
    """This machine's CPU read bandwidth (ram bytes, numa_nodes as detected). measure() -> (bytes/s, method)."""
    if measure is None:
        from cpu_ops.bandwidth import read_bandwidth as measure
    return cached("cpu-bandwidth", CPU_BANDWIDTH_VERSION, machine_key(ram, numa_nodes), measure)


def cached_prefill_macs(ram: int, numa_nodes: int, measure=None) -> Measured:
    """The CPU engine's int8 multiply-adds per second over a prompt tile, all workers."""
    if measure is None:
        from cpu_ops.bandwidth import prefill_macs as measure
    return cached("cpu-prefill-macs", PREFILL_MACS_VERSION, machine_key(ram, numa_nodes), measure)


def cached_staging_bandwidth(ram: int, numa_nodes: int, gpu_name: str, measure) -> Measured:
    """Bytes/s from the model file's pages through pinned staging into this GPU's memory."""
    return cached("gpu-staging", STAGING_VERSION, {**machine_key(ram, numa_nodes), "gpu": gpu_name}, measure)


def machine_key(ram: int, numa_nodes: int) -> dict:
    """What a CPU figure depends on: CPU model, usable CPUs, NUMA nodes, RAM (GiB)."""
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
