"""Reference ops over quantized weights: dequantize a bounded slice, multiply, discard.

These are the op interfaces the forward pass is written against. The reference versions here
run on any torch device and never hold more than `CHUNK_VALUES` dequantized floats at once, so
a weight stays quantized in memory. Given an `Executor`, a CPU-placed weight whose type the CPU
engine supports runs through cpu_ops' kernels instead (same calls, same results to float32 and
activation rounding); unsupported types and other devices keep the reference path.
"""

import warnings
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QType

from cpu_ops.executor import Executor
from cpu_ops.experts import CpuExperts, Stack, supported_stacks
from cpu_ops.matmul import CpuMatrix, CpuStack, supported
from gpu_ops.capabilities import FLOATS
from gpu_ops.experts import GpuExperts, repack_stack
from gpu_ops.matmul import (
    DECODE_TOKENS,
    float_stack_matmul,
    gathered_matmul,
    gpu_matmul,
    has_gpu_format,
    placed,
    repack,
    triton_runs_on,
)
from modelfile.errors import HeteroError
from modelfile.gguf_file import TensorInfo
from modelfile.quants import dequantize

CHUNK_VALUES = 1 << 20  # 4 MiB of float32 per dequantized slice (its temporaries are a few times that)


def quant_matmul(x: torch.Tensor, raw: torch.Tensor, qtype, in_features: int) -> torch.Tensor:
    """x [T, in] @ W.T for W given as raw rows [out, row_bytes]; dequantizes a slice at a time.

    Runs where the weight lives and returns on x's device (the hybrid hand-off in miniature).
    """
    home = x.device
    x = x.to(raw.device)
    out_features = raw.shape[0]
    step = max(1, CHUNK_VALUES // in_features)
    if step >= out_features:
        return (x @ dequantize(raw, qtype, in_features).T).to(home)
    y = x.new_empty(x.shape[0], out_features)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        y[:, start:stop] = x @ dequantize(raw[start:stop], qtype, in_features).T
    return y.to(home)


def raw_tensor(info: TensorInfo, device: torch.device) -> torch.Tensor:
    """The tensor's bytes as uint8 [rows, row_bytes]: a zero-copy view on CPU, a copy elsewhere.

    The view is of a read-only map; nothing in hetero writes to weights.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        raw = torch.from_numpy(info.data)
    if device.type == "cpu":
        return raw
    placed(raw.nbytes)
    return raw.to(device)


def _numpy(x: torch.Tensor) -> np.ndarray:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        x = x.to("cpu", torch.float32)
    return x.detach().contiguous().numpy()


def _torch(y: np.ndarray, device: torch.device) -> torch.Tensor:
    """A kernel's numpy result as a tensor on `device` (no copy on the CPU)."""
    out = torch.from_numpy(y)
    return out if device.type == "cpu" else out.to(device)


GPU_BACKENDS = ("gpu-triton", "gpu-torch")
FLOAT_DTYPES = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}


def built_backend(cpu, gpu, backend: str, qtype) -> str:
    """What an op's calls will run, read from what was built (checked against the plan)."""
    if cpu is not None:
        return "cpu-engine"
    if gpu is not None:
        return "gpu-triton" if gpu.triton else "gpu-torch"
    return backend if backend in GPU_BACKENDS and qtype in FLOATS else "reference"


def check_backend(name: str, backend: str, qtype, in_features: int, device: torch.device, engine) -> None:
    """Refuse to build what the plan names but this machine or these options cannot run."""
    if backend == "cpu-engine" and (engine is None or device.type != "cpu" or not supported(qtype, in_features)):
        raise HeteroError(f"{name}: the plan runs it on the CPU engine, which this load cannot ({qtype.name}; "
                          "no executor or no kernel); make the plan with the same options")  # fmt: skip
    # float weights run through torch whatever the machine has, and through Triton where it runs
    floats_on_torch = qtype in FLOATS and backend == "gpu-torch"
    if backend in GPU_BACKENDS and qtype not in FLOATS and not has_gpu_format(qtype, in_features):
        raise HeteroError(f"{name}: {qtype.name} has no GPU format for the plan's {backend}")
    if backend in GPU_BACKENDS and not floats_on_torch and (backend == "gpu-triton") != triton_runs_on(device):
        can = "cannot" if backend == "gpu-triton" else "does"
        raise HeteroError(f"{name}: the plan says {backend}, but Triton {can} run on {device}")


class QuantLinear:
    """y = x @ W.T for W [out, in] stored in any supported GGUF block format, on the backend the
    plan names (placement.backends): cpu-engine (cpu_ops' kernels on the GGUF blocks),
    gpu-triton / gpu-torch (gpu_ops' lossless repack: Q4_K, Q6_K, Q8_0, Q5_0; floats as they
    are), reference (dequantize a slice per call, on whichever device holds the bytes).
    """

    def __init__(self, info: TensorInfo, device: torch.device, backend: str = "reference", engine=None):
        if len(info.shape) != 2:
            raise ValueError(f"{info.name}: expected a matrix, got shape {info.shape}")
        self.name, self.qtype = info.name, info.qtype
        self.out_features, self.in_features = info.shape
        check_backend(info.name, backend, info.qtype, self.in_features, device, engine)
        self.engine = engine if backend == "cpu-engine" else None
        self.cpu = CpuMatrix(info.data, info.qtype, self.in_features) if self.engine else None
        triton = backend == "gpu-triton"
        self.gpu = (
            repack(info.data, info.qtype, self.in_features, device, triton=triton) if backend in GPU_BACKENDS else None
        )
        if self.gpu is not None:
            device = torch.device("cpu")  # the GGUF bytes stay in the file map, not on the GPU too
        self.raw = raw_tensor(info, device)
        self.backend = built_backend(self.cpu, self.gpu, backend, self.qtype)

    def weight_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of W as float32 [stop - start, in]."""
        return dequantize(self.raw[start:stop], self.qtype, self.in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] float32 -> [T, out]."""
        if self.cpu is not None:
            return _torch(self.cpu(self.engine, self.cpu.quantize(_numpy(x))), x.device)
        if self.gpu is not None:
            return gpu_matmul(x.to(self.gpu.q.device), self.gpu).to(x.device)
        return quant_matmul(x, self.raw, self.qtype, self.in_features)


class Embedding:
    """Row lookup that dequantizes only the rows asked for."""

    def __init__(self, info: TensorInfo, device: torch.device):
        self.qtype = info.qtype
        self.n_rows, self.dim = info.shape
        self.raw = raw_tensor(info, device)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] int64 -> [T, dim] float32, on the device of ids."""
        return dequantize(self.raw[ids.to(self.raw.device)], self.qtype, self.dim).to(ids.device)


class ExpertBank:
    """The routed experts of one layer: stacked gate/up [E, F, D] and down [E, D, F].

    `submit` starts them and returns a handle; on the CPU engine they run on its workers while
    the caller goes on (the shared experts, the GPU), elsewhere they run before it returns.
    """

    def __init__(
        self,
        gate: TensorInfo,
        up: TensorInfo,
        down: TensorInfo,
        device: torch.device,
        backend: str = "reference",
        engine: Executor | None = None,
        shared: tuple[TensorInfo, TensorInfo, TensorInfo] | None = None,
        resident: str = "cpu",
    ):
        """resident: where the plan keeps them ("cpu": a prompt may stream them to the GPU,
        gpu_ops.staging); backend: the plan's for all three stacks (cpu-engine: cpu_ops' fused expert MLP;
        gpu-triton / gpu-torch: gpu_ops.experts, the GGUF bytes staying in the file map;
        reference). shared: the layer's shared-expert matrices [F', D], [F', D], [D, F'] when the
        plan fuses them into this hand-off (see `includes_shared`)."""
        self.n_expert, self.n_ff, self.n_embd = gate.shape
        for t in (gate, up, down):
            check_backend(t.name, backend, t.qtype, t.shape[2], device, engine)
        stacks = [Stack(t.data.reshape(t.shape[0], t.shape[1], -1), t.qtype, t.shape[2]) for t in (gate, up, down)]
        self.resident = resident
        self.gguf_stacks = tuple((s.raw, s.qtype, s.in_features) for s in stacks)  # what a stream copies
        if backend == "cpu-engine" and not supported_stacks(*stacks):
            raise HeteroError(f"{gate.name}: the CPU engine runs gate and up of one type only")
        self.gpu = None
        if backend in GPU_BACKENDS and gate.qtype not in FLOATS:  # float experts: torch on the device
            triton = backend == "gpu-triton"
            self.gpu = GpuExperts(*(repack_stack(t.data, t.qtype, t.shape, device, triton) for t in (gate, up, down)))
            device = torch.device("cpu")
        self.gate = QuantLinear3(gate, device)
        self.up = QuantLinear3(up, device)
        self.down = QuantLinear3(down, device)
        self.cpu = CpuExperts(*stacks, engine) if backend == "cpu-engine" else None
        self.shared_cpu = None
        if shared is not None:
            sh = [Stack(t.data.reshape(1, t.shape[0], -1), t.qtype, t.shape[1]) for t in shared]
            if self.cpu is None or not supported_stacks(*sh):
                raise HeteroError(f"{shared[0].name}: the plan fuses shared experts the CPU engine cannot run")
            self.shared_cpu = CpuExperts(*sh, engine)
        built = built_backend(self.cpu, self.gpu and self.gpu.gate, backend, gate.qtype)
        self.backends = {t.name: built for t in (gate, up, down)}

    @property
    def includes_shared(self) -> bool:
        """Whether submit() also adds the shared experts (the caller must not add them again)."""
        return self.shared_cpu is not None

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> "ExpertResult":
        if self.gpu is not None:
            dev = self.gpu.gate.q.device
            return ExpertResult(value=self.gpu(x.to(dev), ids.to(dev), weights.to(dev)).to(x.device))
        if self.cpu is None:
            return ExpertResult(value=self.reference(x, ids, weights))
        xn = _numpy(x)
        also = ()
        if self.shared_cpu is not None:
            t = xn.shape[0]
            also = ((self.shared_cpu, np.zeros((t, 1), np.int64), np.ones((t, 1), np.float32)),)
        handle = self.cpu.submit(xn, ids.cpu().numpy(), _numpy(weights), also)
        return ExpertResult(handle=handle, device=x.device)

    def submit_shared(self, x: torch.Tensor) -> "ExpertResult":
        """The shared experts fused into this hand-off, alone (the routed ones run elsewhere)."""
        t = x.shape[0]
        handle = self.shared_cpu.submit(_numpy(x), np.zeros((t, 1), np.int64), np.ones((t, 1), np.float32))
        return ExpertResult(handle=handle, device=x.device)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], ids [T, A] int64, weights [T, A] -> sum over A of weight * expert(x), [T, D]
        (plus the shared experts when `includes_shared`)."""
        return self.submit(x, ids, weights).wait()

    def reference(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            xe = x[tok]  # [n, D]
            h = F.silu(self.gate(e, xe)) * self.up(e, xe)  # [n, F]
            out.index_add_(0, tok, self.down(e, h) * weights[tok, slot, None])
        return out


class ExpertResult:
    """A running (or finished) expert computation; wait() gives [T, D] on the caller's device."""

    def __init__(self, value: torch.Tensor | None = None, handle=None, device: torch.device | None = None):
        self.value, self.handle, self.device = value, handle, device

    def wait(self) -> torch.Tensor:
        if self.value is None:
            self.value = _torch(self.handle.wait(), self.device)
        return self.value

    @property
    def finished_at(self) -> float | None:
        """When the CPU workers finished (perf_counter), for profiles; None if it ran inline."""
        return self.handle.handle.finished_at if self.handle is not None else None


class QuantLinear3:
    """A stack of matrices [E, out, in] with per-matrix matmul; used for experts and MLA heads.
    A float stack on the GPU is multiplied as it is stored (gpu_ops.matmul.float_stack_matmul)."""

    def __init__(self, info: TensorInfo, device: torch.device, backend: str = "reference", engine=None):
        self.name, self.qtype = info.name, info.qtype
        self.n, self.out_features, self.in_features = info.shape
        check_backend(info.name, backend, info.qtype, self.in_features, device, engine)
        self.engine = engine if backend == "cpu-engine" else None
        self.cpu = CpuStack(info.data, info.qtype, self.n, self.in_features) if self.engine else None
        triton = backend == "gpu-triton"
        self.gpu = repack_stack(info.data, info.qtype, info.shape, device, triton) if backend in GPU_BACKENDS else None
        if self.gpu is not None:
            self.matrix_ids = torch.arange(self.n, device=device)
            device = torch.device("cpu")
        self.raw = raw_tensor(info, device)
        self.backend = built_backend(self.cpu, self.gpu, backend, self.qtype)
        self.floats = None  # [E, out, in] in the file's float type, where the GPU multiplies it as it is
        if self.qtype in FLOATS and self.backend in GPU_BACKENDS:
            self.floats = self.raw.view(FLOAT_DTYPES[self.qtype]).view(self.n, self.out_features, self.in_features)

    def all(self) -> torch.Tensor:
        """Every matrix as float32 [E, out, in]; only for small stacks (MLA per-head weights)."""
        if self.gpu is not None:
            return self.gpu.dequantize_rows(0, self.n * self.out_features).view(self.n, self.out_features, -1)
        return dequantize(self.raw, self.qtype, self.in_features).reshape(self.n, self.out_features, -1)

    def __call__(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] @ matrix e transposed -> [T, out]."""
        rows = self.raw[e * self.out_features : (e + 1) * self.out_features]
        return quant_matmul(x, rows, self.qtype, self.in_features)

    def per_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, E, in] -> [T, E, out]: slice e of x times matrix e (MLA's per-head absorption)."""
        t = x.shape[0]
        if self.gpu is not None and t <= DECODE_TOKENS:  # one gathered GEMV per (token, matrix)
            ids = self.matrix_ids.expand(t, self.n)
            xs = x.to(ids.device).reshape(t * self.n, self.in_features)
            out = gathered_matmul(xs, self.gpu, ids, x_per_token=False)
            return out.view(t, self.n, self.out_features).to(x.device)
        if self.floats is not None and t <= DECODE_TOKENS:
            out = float_stack_matmul(x.to(self.floats.device), self.floats, self.backend == "gpu-triton")
            return out.to(x.device)
        if self.cpu is None:
            return torch.einsum("tei,eoi->teo", x, self.all().to(x.device))
        out = self.cpu(self.engine, _numpy(x.transpose(0, 1)).reshape(self.n * t, self.in_features), t)
        return _torch(out, x.device).view(t, self.n, self.out_features)


def split_joint_kv_b(info: TensorInfo, n_head: int, nope: int, v_dim: int) -> tuple[TensorInfo, TensorInfo]:
    """The legacy joint attn_kv_b [H * (N + V), R] as the split layout's stacks: W_UK transposed
    per head, k_b [H, R, N], in float (a transposed quantized block is not a block: float16, or
    the file's own float type), and W_UV, v_b [H, V, R], its own rows' bytes copied. Made once
    at load, so that a decoded token multiplies stacks instead of dequantizing kv_b."""
    rank = info.shape[1]
    rows = np.asarray(info.data).reshape(n_head, nope + v_dim, -1)  # uint8 [H, N+V, row bytes]
    v = np.ascontiguousarray(rows[:, nope:]).reshape(n_head * v_dim, -1)
    keys = dequantize(torch.from_numpy(np.ascontiguousarray(rows[:, :nope]).reshape(n_head * nope, -1)),
                      info.qtype, rank).view(n_head, nope, rank).transpose(1, 2)  # fmt: skip
    k_type = info.qtype if info.qtype in FLOAT_DTYPES else QType.F16
    k = keys.to(FLOAT_DTYPES[k_type]).contiguous().view(torch.uint8)
    return (
        replace(info, name=f"{info.name} (W_UK)", qtype=k_type, shape=(n_head, rank, nope),
                data=k.numpy().reshape(n_head * rank, -1)),
        replace(info, name=f"{info.name}{VALUES_OF_JOINT}", shape=(n_head, v_dim, rank), data=v),
    )  # fmt: skip


VALUES_OF_JOINT = " (W_UV)"  # the W_UV stack's name suffix: it keeps kv_b's blocks, so its backend


def planned_name(op_name: str) -> str | None:
    """The plan's tensor an op stands for: the joint kv_b for its W_UV stack (what a GPU builds
    instead of it); the op's own name otherwise, None for the float W_UK stack made beside it."""
    if op_name.endswith(VALUES_OF_JOINT):
        return op_name.removesuffix(VALUES_OF_JOINT)
    return None if op_name.endswith(" (W_UK)") else op_name


def vector(info: TensorInfo, device: torch.device) -> torch.Tensor:
    """A small tensor (norm weight, bias) dequantized to float32 in its numpy shape."""
    flat = dequantize(np.ascontiguousarray(info.data).reshape(1, -1), info.qtype, info.n_values)
    return flat.reshape(info.shape).to(device)
