"""Compile the Triton kernels for an H100 (sm_90) ahead of time, with no GPU, and count the
memory and tensor-core instructions in their PTX. Prints one JSON object.

Run in a process without TRITON_INTERPRET (under it, triton.jit makes interpreted functions).
Arguments are specialised as Triton's launcher would for real tensors and shapes: pointers
16-byte aligned, K and N divisible by 16.
"""

import json
import os
import re
from collections import Counter

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import gpu_ops.triton_attention as ta  # noqa: E402
import gpu_ops.triton_kernels as tk  # noqa: E402

ALIGNED = [["tt.divisibility", 16]]
INSTRUCTIONS = re.compile(r"(ld\.global[.\w]*|cp\.async\.\w+\.shared\.global|mma\.sync[.\w]*|wgmma[.\w]*)")


def compile_ptx(fn, types: dict[str, str], aligned: set[str], constexprs: dict) -> str:
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    attrs = {(i,): ALIGNED for i, n in enumerate(names) if n in aligned}
    consts = {(names.index(n),): v for n, v in constexprs.items()}
    kernel = triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32))
    return kernel.asm["ptx"]


def counts(ptx: str) -> dict[str, int]:
    return dict(Counter(INSTRUCTIONS.findall(ptx)))


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
    }
    int8 = {**int4, "q_ptr": "*i8", "sc_ptr": "*i8"}  # fmt: skip
    aligned = pointers | {"N", "K"}
    out = {}
    for name, gather, dot, block_m in (
        ("gemv", False, False, 1),
        ("gathered", True, False, 1),
        ("gemm", False, True, 32),
    ):
        flags = {"X_DIV": 1, "GATHER": gather, "DOT": dot, "BLOCK_M": block_m, "BLOCK_N": tk.BLOCK_N}
        out[f"int4 {name}"] = counts(compile_ptx(tk._int4_kernel, int4, aligned, flags))
        for label, d_group, has_sc in (("q8_0", 32, False), ("q6_k", 256, True)):
            flags8 = {**flags, "D_GROUP": d_group, "HAS_SC": has_sc}
            out[f"int8 {label} {name}"] = counts(compile_ptx(tk._int8_kernel, int8, aligned, flags8))
    attention = {"ql_ptr": "*fp32", "qr_ptr": "*fp32", "cache_ptr": "*fp32", "len_ptr": "*i64", "o_ptr": "*fp32",
                 "H": "i32", "R": "i32", "P": "i32", "ROW": "i32", "scale": "fp32"}  # fmt: skip
    blocks = {"BLOCK_H": ta.BLOCK_H, "BLOCK_S": ta.BLOCK_S, "BLOCK_R": 512, "BLOCK_P": 64}
    attn_aligned = {"ql_ptr", "qr_ptr", "cache_ptr", "len_ptr", "o_ptr", "R", "P", "ROW"}
    out["mla decode"] = counts(compile_ptx(ta._mla_decode_kernel, attention, attn_aligned, blocks))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
