"""Compile the Triton kernels for an H100 (sm_90) ahead of time, with no GPU, and count the
memory and tensor-core instructions in their PTX, and registers and spills in their cubin
(cuobjdump, shipped with Triton). Prints one JSON object.

Run in a process without TRITON_INTERPRET (under it, triton.jit makes interpreted functions).
Arguments are specialised as Triton's launcher would for real tensors and shapes: pointers
16-byte aligned, K and N divisible by 16.
"""

import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import gpu_ops.triton_attention as ta  # noqa: E402
import gpu_ops.triton_kernels as tk  # noqa: E402

ALIGNED = [["tt.divisibility", 16]]
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
INSTRUCTIONS = re.compile(r"(ld\.global[.\w]*|cp\.async\.\w+\.shared\.global|mma\.sync[.\w]*|wgmma[.\w]*)")


def compile_ptx(fn, types: dict[str, str], aligned: set[str], constexprs: dict, options=None) -> dict[str, int]:
    """Instruction counts of the kernel's PTX, plus its registers and spill stack per thread."""
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    attrs = {(i,): ALIGNED for i, n in enumerate(names) if n in aligned}
    consts = {(names.index(n),): v for n, v in constexprs.items()}
    kernel = triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32), options=options)
    out = dict(Counter(INSTRUCTIONS.findall(kernel.asm["ptx"])))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    out["registers"] = int(re.search(r"REG:(\d+)", usage).group(1))
    out["spill stack bytes"] = int(re.search(r"STACK:(\d+)", usage).group(1))
    return out


def main() -> None:
    pointers = {"x_ptr", "q_ptr", "sc_ptr", "mn_ptr", "d_ptr", "dmin_ptr", "y_ptr", "ids_ptr"}
    int4 = {
        "x_ptr": "*fp32",
        "q_ptr": "*u8",
        "sc_ptr": "*u8",
        "mn_ptr": "*u8",
        "d_ptr": "*fp16",
        "dmin_ptr": "*fp16",
        "y_ptr": "*fp32",
        "ids_ptr": "*i64",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "TPG": "i32",
        "SPLIT_CHUNKS": "i32",
    }
    int8 = {**int4, "q_ptr": "*i8", "sc_ptr": "*i8"}  # fmt: skip
    aligned = pointers | {"N", "K"}
    out = {}
    for name, gather, dot, block_m in (
        ("gemv", False, False, 1),  # one token: products kept apart until the end (WIDE)
        ("8-token gemv", False, False, 8),  # a few tokens: each chunk summed as it comes
        ("gathered", True, False, 1),
        ("gemm", False, True, 32),
    ):
        wide = block_m == 1 and not dot
        flags = {"X_DIV": 1, "GATHER": gather, "DOT": dot, "WIDE": wide, "BLOCK_M": block_m, "BLOCK_N": tk.BLOCK_N}
        out[f"int4 {name}"] = compile_ptx(tk._int4_kernel, int4, aligned, flags)
        for label, d_group, has_sc, has_min, d_type in (("q8_0", 32, False, False, "*fp16"),
                                                        ("q6_k", 256, True, False, "*fp16"),
                                                        ("grid", 256, True, False, "*fp32"),
                                                        ("with min", 256, True, True, "*fp16"),
                                                        ("with min per 32", 32, True, True, "*fp16")):  # fmt: skip
            flags8 = {**flags, "D_GROUP": d_group, "HAS_SC": has_sc, "HAS_MIN": has_min}
            out[f"int8 {label} {name}"] = compile_ptx(tk._int8_kernel, {**int8, "d_ptr": d_type}, aligned, flags8)
    attention = {"ql_ptr": "*fp32", "qr_ptr": "*fp32", "cache_ptr": "*fp32", "len_ptr": "*i64", "m_ptr": "*fp32",
                 "l_ptr": "*fp32", "acc_ptr": "*fp32", "H": "i32", "R": "i32", "P": "i32", "ROW": "i32",
                 "SPLIT_LEN": "i32", "scale": "fp32"}  # fmt: skip
    blocks = {"BLOCK_H": ta.BLOCK_H, "BLOCK_S": ta.BLOCK_S, "BLOCK_R": 512, "BLOCK_P": 64,
              "DOT_PRECISION": ta.DOT_PRECISION}  # fmt: skip
    attn_aligned = {
        "ql_ptr",
        "qr_ptr",
        "cache_ptr",
        "len_ptr",
        "m_ptr",
        "l_ptr",
        "acc_ptr",
        "R",
        "P",
        "ROW",
        "SPLIT_LEN",
    }
    floats = {"x_ptr": "*fp32", "y_ptr": "*fp32", "E": "i32", "OUT": "i32", "IN": "i32"}
    float_blocks = {"BLOCK_O": tk.FLOAT_BLOCK_O, "BLOCK_I": tk.FLOAT_BLOCK_I}
    for label, w_type in (("float16", "*fp16"), ("bfloat16", "*bf16")):
        out[f"{label} stack gemv"] = compile_ptx(tk._float_stack_kernel, {**floats, "w_ptr": w_type},
                                                 {"x_ptr", "w_ptr", "y_ptr", "OUT", "IN"}, float_blocks)  # fmt: skip
    out["mla decode"] = compile_ptx(ta._mla_decode_kernel, attention, attn_aligned, blocks, ta.LAUNCH)
    attention_bf16 = {**attention, "cache_ptr": "*bf16"}  # the GPU's cache
    out["mla decode bf16 cache"] = compile_ptx(ta._mla_decode_kernel, attention_bf16, attn_aligned, blocks, ta.LAUNCH)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
