"""The machine a plan is made for: detected, named from a small table, or given by flags."""

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from modelfile.errors import HeteroError

GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    gpu_name: str  # "none" when planning CPU-only
    gpu_mem: int  # bytes the plan may use on the GPU
    gpu_bw: float  # bytes/s of device memory
    gpu_flops: float  # dense fp16/bf16 tensor-core FLOP/s
    cpu_cores: int
    numa_nodes: int
    ram: int  # bytes
    cpu_bw: float  # bytes/s of DRAM read bandwidth, all nodes
    cpu_flops: float  # FLOP/s of the cores together
    source: str  # how these numbers were obtained
    disk_bw: float = 2e9  # bytes/s of page-cache misses on the model file (plans over RAM only)
    cpu_engine: bool = True  # the CPU can run cpu_ops' kernels (AVX2), and the run may use them
    gpu_kernels: str = "triton"  # "triton" where Triton runs on the GPU, else "torch"
    cpu_macs: float = 0.0  # int8 multiply-adds/s of the CPU engine on a prompt tile (0: unmeasured)
    pcie_bw: float = 0.0  # bytes/s from host RAM through pinned staging into GPU memory (0: no GPU)

    @property
    def gpu_is_stand_in(self) -> bool:
        """Whether the plan's "gpu" is the CPU standing in for one (no CUDA here)."""
        return self.gpu_name == STAND_IN_GPU


# name -> (memory, bandwidth, dense fp16 tensor FLOP/s), from the vendors' data sheets.
GPUS = {
    "rtx3090": (24 * GiB, 936e9, 71e12),
    "rtx4080": (16 * GiB, 717e9, 97e12),
    "rtx4090": (24 * GiB, 1008e9, 165e12),
    "rtx5090": (32 * GiB, 1792e9, 209e12),
    "rtx-a6000": (48 * GiB, 768e9, 155e12),
    "l40s": (48 * GiB, 864e9, 362e12),
    "a100-80g": (80 * GiB, 2039e9, 312e12),
    "h100": (80 * GiB, 3350e9, 989e12),
    "h200": (141 * 10**9, 4800e9, 989e12),
    "rtx3080": (10 * GiB, 760e9, 59e12),
    "rtx4070": (12 * GiB, 504e9, 58e12),
    "a10": (24 * GiB, 600e9, 125e12),
    "l4": (24 * GiB, 300e9, 121e12),
}
# memory configuration -> theoretical read bandwidth (channels x MT/s x 8 bytes).
CPU_MEMORY = {
    "ddr4-3200x2": 51.2e9,
    "ddr5-5600x2": 89.6e9,
    "ddr4-3200x8": 204.8e9,
    "ddr5-4800x8": 307.2e9,
    "ddr5-4800x12": 460.8e9,
    "ddr5-4800x16": 614.4e9,
}
UNKNOWN_GPU_BW, UNKNOWN_GPU_FLOPS = 1000e9, 150e12  # an RTX 4090-class card
ASSUMED_GPU = "none detected; assumed RTX 4090-class"
STAND_IN_GPU = "the CPU standing in for a GPU"
CPU_FLOPS_PER_CORE = 100e9  # AVX-512 FMA at ~3 GHz; AMX would be far higher
PCIE4_X16 = 25e9  # bytes/s a host-to-device copy reaches on PCIe 4.0 x16 (of 31.5 on the wire)


def parse_size(text: str) -> int:
    """'24GiB', '24G', '512 MiB', '0' -> bytes (G and GB are read as GiB; decimal GB is rare for VRAM)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m:
        raise HeteroError(f"cannot read size {text!r}; write e.g. 24GiB or 512MiB")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m[2].upper()]
    return int(float(m[1]) * scale)


def parse_rate(text: str) -> float:
    """'300GB/s' or '300' (GB/s) -> bytes/s."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(GB/s|TB/s|MB/s)?\s*", text, re.I)
    if not m:
        raise HeteroError(f"cannot read bandwidth {text!r}; write e.g. 300GB/s")
    try:
        rate = float(m[1]) * {"MB/S": 1e6, "GB/S": 1e9, "TB/S": 1e12}[(m[2] or "GB/s").upper()]
    except ValueError:
        raise HeteroError(f"cannot read bandwidth {text!r}; write e.g. 300GB/s") from None
    if not 1e6 <= rate < 1e15:
        raise HeteroError(f"bandwidth {text!r} is not a plausible memory bandwidth (1 MB/s to 1000 TB/s)")
    return rate


def detect(measure_cpu: bool = True, measure_prefill: bool = True) -> Hardware:
    """This machine: cores, NUMA nodes, RAM, the CUDA GPU if any, and the measured figures
    (placement.measured, each probed once and cached): CPU read bandwidth, the CPU engine's
    prompt multiply-adds, the GPU's staging bandwidth. measure_cpu=False when --cpu-bw will
    replace the bandwidth anyway; measure_prefill=False leaves the multiply-adds unmeasured."""
    from cpu_ops.topology import detect_topology

    cores = os.cpu_count() or 1
    nodes = len(detect_topology().nodes)  # as the executor counts them: nodes with CPUs we may use
    ram = meminfo("MemTotal")
    notes = ["detected"]
    cpu_bw = 0.0
    if measure_cpu:
        from placement.measured import cached_cpu_bandwidth

        measured = cached_cpu_bandwidth(ram, nodes)
        cpu_bw = measured.bytes_per_s
        notes.append(measured.describe())
    from cpu_ops.simd import HAVE_AVX2

    hw = Hardware("none", 0, 0.0, 0.0, cores, nodes, ram, cpu_bw, cores * CPU_FLOPS_PER_CORE, "", cpu_engine=HAVE_AVX2)
    if not HAVE_AVX2:
        notes.append("no AVX2: CPU weights take the reference path")
    elif measure_prefill:
        from placement.measured import cached_prefill_macs

        macs = cached_prefill_macs(ram, nodes)
        hw = replace(hw, cpu_macs=macs.value)
        notes.append(macs.describe("CPU prompt multiply-adds"))
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            known = _lookup_gpu(props.name)
            bw, flops = (known[1], known[2]) if known else (UNKNOWN_GPU_BW, UNKNOWN_GPU_FLOPS)
            hw = replace(hw, gpu_name=props.name, gpu_mem=props.total_memory, gpu_bw=bw, gpu_flops=flops)
            hw = replace(hw, gpu_kernels=_gpu_kernels("cuda"))
            from gpu_ops.staging import staging_bandwidth
            from placement.measured import cached_staging_bandwidth

            staging = cached_staging_bandwidth(ram, nodes, props.name, lambda: staging_bandwidth(torch.device("cuda")))
            hw = replace(hw, pcie_bw=staging.value)
            notes.append(staging.describe("GPU staging bandwidth"))
            if not known:
                notes.append(f"{props.name} is not in hetero's GPU table: assumed {bw / 1e9:.0f} GB/s")
        else:
            notes.append("no GPU detected")
    except (ImportError, RuntimeError):
        notes.append("no GPU detected")
    return replace(hw, source="; ".join(notes))


def with_overrides(
    hw: Hardware, gpu=None, gpu_mem=None, cpu_bw=None, ram=None, cpu_cores=None, disk_bw=None, stand_in=False,
    pcie_bw=None,
) -> Hardware:  # fmt: skip
    """Apply --gpu NAME, --gpu-mem SIZE, --cpu-bw RATE|MEMCONFIG, --ram SIZE, --cpu-cores N,
    --disk-bw RATE, --pcie-bw RATE on top of hw. A GPU budget where no GPU was detected plans
    for an assumed RTX 4090-class card, or, with stand_in (a run, not a plan), for the CPU that
    will play it (its "PCIe" a memory copy: each byte read and written). A GPU not measured here
    is fed at PCIe 4.0 x16's practical rate unless --pcie-bw says otherwise. The engine's
    multiply-adds scale with --cpu-cores (a prompt tile is compute-bound)."""
    notes = []
    if cpu_cores is not None:
        if cpu_cores < 1:
            raise HeteroError(f"--cpu-cores {cpu_cores} must be at least 1")
        macs = hw.cpu_macs * cpu_cores / hw.cpu_cores
        hw = replace(hw, cpu_cores=cpu_cores, cpu_flops=cpu_cores * CPU_FLOPS_PER_CORE, cpu_macs=macs)
        notes.append(f"--cpu-cores {cpu_cores}")
    if cpu_bw is not None:
        bw = CPU_MEMORY.get(cpu_bw.lower()) if isinstance(cpu_bw, str) else parse_rate(f"{float(cpu_bw) / 1e9}GB/s")
        hw = replace(hw, cpu_bw=bw if bw is not None else parse_rate(cpu_bw))
        notes.append(f"--cpu-bw {cpu_bw}")
    if gpu is not None:
        if gpu == "none":
            hw = replace(hw, gpu_name="none", gpu_mem=0, gpu_bw=0.0, gpu_flops=0.0, pcie_bw=0.0)
        else:
            known = _lookup_gpu(gpu)
            if not known:
                raise HeteroError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)} (or give --gpu-mem)")
            hw = replace(hw, gpu_name=gpu, gpu_mem=known[0], gpu_bw=known[1], gpu_flops=known[2], pcie_bw=PCIE4_X16)
        notes.append(f"--gpu {gpu}")
    if gpu_mem is not None:
        size = parse_size(gpu_mem) if isinstance(gpu_mem, str) else int(gpu_mem)
        if size == 0:
            hw = replace(hw, gpu_name="none", gpu_mem=0, gpu_bw=0.0, gpu_flops=0.0, pcie_bw=0.0)
        elif hw.gpu_name == "none" and stand_in:  # device memory read as fast as the CPU reads RAM
            hw = replace(hw, gpu_name=STAND_IN_GPU, gpu_mem=size, gpu_bw=hw.cpu_bw, gpu_flops=hw.cpu_flops)
            hw = replace(hw, gpu_kernels=_gpu_kernels("cpu"), pcie_bw=hw.cpu_bw / 2)
        elif hw.gpu_name == "none":
            hw = replace(hw, gpu_name=ASSUMED_GPU, gpu_mem=size, gpu_bw=UNKNOWN_GPU_BW, gpu_flops=UNKNOWN_GPU_FLOPS)
            hw = replace(hw, pcie_bw=PCIE4_X16)
        else:
            hw = replace(hw, gpu_mem=size)
        notes.append(f"--gpu-mem {gpu_mem}")
    if ram is not None:
        hw = replace(hw, ram=parse_size(ram) if isinstance(ram, str) else int(ram))
        notes.append(f"--ram {ram}")
    if disk_bw is not None:
        hw = replace(hw, disk_bw=parse_rate(disk_bw) if isinstance(disk_bw, str) else float(disk_bw))
        notes.append(f"--disk-bw {disk_bw}")
    if pcie_bw is not None and not hw.gpu_mem:
        raise HeteroError("--pcie-bw needs a GPU in the plan (--gpu NAME or --gpu-mem SIZE)")
    if pcie_bw is not None:
        hw = replace(hw, pcie_bw=parse_rate(pcie_bw) if isinstance(pcie_bw, str) else float(pcie_bw))
        notes.append(f"--pcie-bw {pcie_bw}")
    return replace(hw, source=hw.source + (" + " + " ".join(notes) if notes else ""))


def _gpu_kernels(device: str) -> str:
    """Whether the GPU's part will run Triton kernels on this device type: the ops' own rule."""
    import torch

    from gpu_ops.matmul import triton_runs_on

    return "triton" if triton_runs_on(torch.device(device)) else "torch"


def _lookup_gpu(name: str):
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    for known, spec in GPUS.items():
        if re.sub(r"[^a-z0-9]", "", known) in key:
            return spec
    return None


def meminfo(field: str) -> int:
    """A /proc/meminfo field (MemTotal, MemAvailable, ...) in bytes; 0 where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure_read_bandwidth(megabytes: int = 256) -> float:
    """Bytes/s of a parallel read with every CPU, measured now (benchmarks; plans use the cached figure)."""
    from cpu_ops.bandwidth import read_bandwidth

    return read_bandwidth(megabytes)[0]
