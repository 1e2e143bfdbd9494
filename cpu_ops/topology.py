"""Which CPUs belong to which NUMA node, read from /sys (or given, to simulate a machine)."""

import os
import re
from dataclasses import dataclass
from pathlib import Path

NODE_ROOT = Path("/sys/devices/system/node")


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


@dataclass(frozen=True)
class Topology:
    nodes: tuple[tuple[int, ...], ...]  # CPU ids per NUMA node, only CPUs this process may use

    @property
    def n_cpus(self) -> int:
        return sum(len(n) for n in self.nodes)

    def node_of_cpu(self, cpu: int) -> int:
        return next(i for i, n in enumerate(self.nodes) if cpu in n)


def detect_topology(root: Path = NODE_ROOT) -> Topology:
    """NUMA nodes with the CPUs of our affinity mask; one node when /sys says nothing."""
    allowed = sorted(os.sched_getaffinity(0))
    nodes = []
    for d in sorted(root.glob("node[0-9]*"), key=lambda p: int(re.sub(r"\D", "", p.name))):
        try:
            cpus = [c for c in parse_cpulist((d / "cpulist").read_text()) if c in allowed]
        except OSError:
            continue
        if cpus:
            nodes.append(tuple(cpus))
    if not nodes or sum(len(n) for n in nodes) != len(allowed):
        return Topology((tuple(allowed),))
    return Topology(tuple(nodes))


def simulated(n_nodes: int, cpus: list[int] | None = None) -> Topology:
    """Split our CPUs into n_nodes pretend nodes (tests of the NUMA partitioning on one node)."""
    cpus = cpus if cpus is not None else sorted(os.sched_getaffinity(0))
    if n_nodes < 1:
        raise ValueError("need at least one node")
    return Topology(tuple(tuple(cpus[i::n_nodes]) or (cpus[i % len(cpus)],) for i in range(n_nodes)))
