"""A toy quant type declared in one place, then used end to end (run by tests/test_toy_quant.py).

The toy is Q8_1 in gguf's layout, a type hetero does not run: per 32 values a float32 scale d,
a float32 d * sum(q) (unused here), and 32 int8 values q; value = d * q. Its declaration below is
the only thing written for it: the file reader, the planner, the reference path, the CPU
engine's matmul, expert and native-step kernels all take it from there.

It must be declared before the kernel packages are imported (they read the declarations once),
so this runs as its own process: `python -m tests.toy_quant DIR` prints a JSON report.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from modelfile.quants.types import QuantType, declare


def toy_dequantize(blocks: torch.Tensor) -> torch.Tensor:
    """[N, 40] uint8 -> [N, 32] float32."""
    d = blocks[:, :4].contiguous().view(torch.float32)
    return d * blocks[:, 8:].contiguous().view(torch.int8).float()


def toy_body(b, w, acts):
    """The engine's block body (cpu_ops/blocks.py's signature): per token, the int8 dot product
    of the block's values with the activations' (in 8 lanes), times d and the activations' scale."""
    from cpu_ops.simd import F32, I8, I16, broadcast, dot_s8_s8, from_scalars, load, madd_i16, splat, to_float

    q, d = load(b, w, 8, I8, 32), load(b, w, 0, F32)
    out = []
    for a in acts:
        dot = madd_i16(b, dot_s8_s8(b, q, load(b, a.xq, 0, I8, 32)), splat(I16, 16, 1))  # 8 x i32
        scale = broadcast(b, from_scalars(b, [b.fmul(load(b, a.dx, 0, F32), d)]), 0, 8)
        out.append(b.fmul(to_float(b, dot), scale))
    return out


TOY = declare(QuantType(T.Q8_1, toy_dequantize, "simple", engine=toy_body))


def toy_encode(values: np.ndarray) -> np.ndarray:
    """float32 [..., K] -> Q8_1 blocks, uint8 [..., K / 32 * 40]."""
    x = values.reshape(-1, 32).astype(np.float32)
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    q = np.clip(np.round(x / np.maximum(d, 1e-30)), -127, 127).astype(np.int8)
    s = d * q.sum(axis=1, keepdims=True).astype(np.float32)
    blocks = np.concatenate([d.view(np.uint8), s.view(np.uint8), q.view(np.uint8)], axis=1)
    return blocks.reshape(*values.shape[:-1], -1)


def write_toy_model(directory: Path) -> Path:
    """The tiny preset (every expert used: no near-tied choice between executors), its matrices
    and expert stacks in the toy type, norms in float32."""
    from gguf import GGUFReader, GGUFWriter

    from hetero.synth.writer import copy_metadata, write_synthetic

    source = write_synthetic(directory / "f32.gguf", "tiny", "F32", n_expert_used=8)[0]
    reader = GGUFReader(source)
    target = directory / "toy.gguf"
    w = GGUFWriter(target, str(reader.fields["general.architecture"].contents()))
    copy_metadata(reader, w)
    for t in reader.tensors:
        values = np.asarray(t.data, np.float32)
        if values.ndim >= 2:
            w.add_tensor(t.name, toy_encode(values), raw_dtype=T.Q8_1)
        else:
            w.add_tensor(t.name, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return target


def main(directory: Path) -> dict:
    from cpu_ops.activations import quantize
    from cpu_ops.blocks import BLOCKS
    from cpu_ops.matmul import CpuMatrix
    from modelfile.quants import dequantize

    report = {"engine_code": BLOCKS[T.Q8_1].code}
    rng = np.random.default_rng()

    # the engine's matmul against float64 over the same quantized activations
    k, rows = 256, 37
    raw = toy_encode(rng.standard_normal((rows, k)).astype(np.float32) * rng.uniform(0.1, 5))
    dense = dequantize(torch.from_numpy(raw), T.Q8_1, k).double().numpy()
    acts = quantize(rng.standard_normal((3, k)).astype(np.float32), BLOCKS[T.Q8_1].act_form)
    x = acts.dequantized()
    ours = CpuMatrix(raw, T.Q8_1, k)(None, acts)
    report["matmul_error_over_bound"] = float((np.abs(ours - x @ dense.T) / (np.abs(x) @ np.abs(dense).T)).max())

    # the native step's dispatch on the toy's code: bit-identical to the toy's own kernel
    from cpu_ops.decode import _kernel

    one = quantize(acts.xf[:1], BLOCKS[T.Q8_1].act_form)
    native = np.zeros(rows, np.float32)
    _kernel(BLOCKS[T.Q8_1].code, raw.reshape(-1), 0, raw.shape[1], rows, k // 32, one.xq, one.dx, one.xs, one.xf,
            native, 0)  # fmt: skip
    report["native_dispatch_exact"] = bool(np.array_equal(native, CpuMatrix(raw, T.Q8_1, k)(None, one)[0]))

    import hetero
    from modelfile.gguf_file import GGUFModelFile

    path = write_toy_model(directory)
    file = GGUFModelFile(path)
    toy_names = {n for n, t in file.tensors.items() if t.qtype == T.Q8_1}
    model = hetero.load_model(path)
    placed = {p.name: p for p in model.plan.placements}
    toy_matrices = toy_names - {"token_embd.weight"}  # the embedding is a row lookup
    report["cpu_backends"] = sorted({placed[n].backend for n in toy_matrices})
    report["planned_bytes_match"] = all(placed[n].bytes == file.tensors[n].nbytes for n in toy_names)
    report["executor"] = model.executor_name
    report["built"] = sorted({model.backends()[n] for n in toy_matrices})

    ids = [1, *rng.integers(3, 600, 7).tolist()]
    cache = model.new_cache(len(ids))
    model.forward(ids[:3], cache)
    decoded = np.concatenate([model.forward([t], cache).numpy() for t in ids[3:]])  # the native step
    report["native_decode_finite"] = bool(np.isfinite(decoded).all())
    reference = hetero.load_model(path, cpu_kernels=False)  # the toy's dequantize + torch, float activations
    ref = reference.logits(ids)[3:]
    eager_all = model.logits(ids)[3:]
    report["engine_vs_reference"] = float(np.linalg.norm(eager_all - ref) / np.linalg.norm(ref))
    report["reference_backends"] = sorted({p.backend for p in reference.plan.placements if p.name in toy_matrices})

    gpu_plan = hetero.model.default_plan(file, gpu_mem="8GiB")
    on_gpu = [p for p in gpu_plan.placements if p.name in toy_matrices and p.device == "gpu"]
    report["gpu_backends"] = sorted({p.backend for p in on_gpu})
    report["gpu_warns"] = any("reference" in w for w in gpu_plan.warnings)
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
