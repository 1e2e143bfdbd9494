"""Which kernel family runs each tensor, and how fast the planner assumes it reads its bytes.

The backend is decided here, once, from what the kernel packages declare they can run
(cpu_ops.capabilities, gpu_ops.capabilities) and the machine; the loader builds exactly that
(hetero.model checks it) and the prediction reads bytes at that backend's speed:

  cpu-engine  cpu_ops' SIMD kernels on GGUF blocks            50% of CPU bandwidth
  gpu-triton  gpu_ops' Triton kernels on repacked tiles        70% of GPU bandwidth
              (and on derived float stacks, widened in registers)
  gpu-torch   the same tiles (or float weights) through torch  70% for float32, 14% for float16
                                                               and bfloat16 (widened to float32 on
                                                               each call: 5x the traffic), 10% for
                                                               tiles
  reference   dequantize a slice per call, multiply in torch   per type (cpu_ops.capabilities) on
                                                               the CPU; 2% of GPU bandwidth there
  vector      norms and biases: float32, made once at load
  lookup      the embedding: the rows asked for, dequantized

The GPU figures other than gpu-triton's are assumptions until a GPU session measures them
(benchmarks/gpu_check.py).
"""

from dataclasses import replace

from cpu_ops.capabilities import engine_bytes_per_s, experts_run_on_engine, reference_bytes_per_s, runs_on_engine
from gpu_ops.capabilities import FLOATS, has_gpu_format
from placement.cost import TensorCost, gpu_format
from placement.hardware import Hardware

BACKENDS = ("cpu-engine", "gpu-triton", "gpu-torch", "reference", "vector", "lookup")
CPU_ENGINE_EFFICIENCY = 0.5
GPU_TRITON_EFFICIENCY = 0.7
GPU_TORCH_TILES_EFFICIENCY = 0.1
GPU_REFERENCE_EFFICIENCY = 0.02
# torch multiplies float16/bfloat16 weights as float32: per weight 2 bytes read, 4 written, 4 read
HALF_WIDENING = 5


def backend(c: TensorCost, device: str, hw: Hardware) -> str:
    if c.row == 0:
        return "vector"
    if c.kind == "embedding":
        return "lookup"
    if device == "cpu":  # the engine multiplies the tensor and whatever the loader derives from it
        engine = hw.cpu_engine and all(runs_on_engine(q, shape[-1]) for q, shape in ((c.qtype, (c.row,)), *c.derived))
        return "cpu-engine" if engine else "reference"
    if c.qtype in FLOATS:
        return "gpu-torch"
    if has_gpu_format(c.qtype, c.row):
        return "gpu-triton" if hw.gpu_kernels == "triton" else "gpu-torch"
    return "reference"


def expert_trio_backend(trio: tuple[TensorCost, TensorCost, TensorCost], device: str, hw: Hardware) -> str:
    """A layer's routed experts run as one op: gate, up and down share a backend, the slowest
    one's when they cannot all take the fast kernel together."""
    if device == "cpu":
        fused = hw.cpu_engine and experts_run_on_engine(*((c.qtype, c.row) for c in trio))
        return "cpu-engine" if fused else "reference"
    if all(has_gpu_format(c.qtype, c.row) for c in trio):
        return "gpu-triton" if hw.gpu_kernels == "triton" else "gpu-torch"
    return "gpu-torch" if all(c.qtype in FLOATS for c in trio) else "reference"


def read_rate(c: TensorCost, device: str, name: str, hw: Hardware) -> float:
    """Bytes per second the backend `name` reads this tensor's weights at, on `device`."""
    if device == "cpu":
        engine = min(hw.cpu_bw * CPU_ENGINE_EFFICIENCY, engine_bytes_per_s(c.qtype, hw.cpu_cores))
        return min(engine, reference_bytes_per_s(c.qtype, hw.cpu_cores)) if name == "reference" else engine
    if name == "reference":
        return hw.gpu_bw * GPU_REFERENCE_EFFICIENCY
    if name == "gpu-torch" and c.qtype not in FLOATS:
        return hw.gpu_bw * GPU_TORCH_TILES_EFFICIENCY
    if name == "gpu-torch" and FLOATS[c.qtype][1] == 2:
        return hw.gpu_bw * GPU_TRITON_EFFICIENCY / HALF_WIDENING
    return hw.gpu_bw * GPU_TRITON_EFFICIENCY


def gpu_read_seconds(c: TensorCost, name: str, hw: Hardware) -> float:
    """Seconds to read all of a GPU tensor's weights once: the stacks the loader derives from
    it each at its own type's rate on the tensor's backend (a float stack through torch is
    widened in memory, through Triton in registers), else the tensor at its backend's."""
    if not c.derived or name == "reference":
        return c.gpu_bytes / read_rate(c, "gpu", name, hw)
    seconds = 0.0
    for qtype, shape in c.derived:
        stack = replace(c, qtype=qtype, derived=())
        _, size = gpu_format(qtype, shape, 0)
        seconds += size / read_rate(stack, "gpu", name, hw)
    return seconds
