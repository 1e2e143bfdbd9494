"""A quantized matrix on the CPU: y = x @ W.T with W's rows split over the executor's workers."""

import functools

import numpy as np

from cpu_ops.activations import QuantizedActivations, quantize
from cpu_ops.blocks import BLOCKS, ROWS
from cpu_ops.capabilities import runs_on_engine
from cpu_ops.executor import Executor
from cpu_ops.kernels import MATMUL, MATMUL_STACK, is_prompt

# less work than this (bytes of weights times tokens) runs on the calling thread: a hand-off
# (~70 us) costs more. Counted per call, not per matrix: MLA's per-head stacks are under 1 MiB,
# but a prompt's tokens through them are 16 ms of one thread (V2-Lite, 64 tokens).
INLINE_BYTES = 1 << 20


def _inline(executor: Executor | None, weight_bytes: int, n_tokens: int) -> bool:
    return executor is None or weight_bytes * n_tokens < INLINE_BYTES


supported = runs_on_engine  # whether the CPU kernels multiply this type at this row width


@functools.cache  # called per matmul on the decode path with a handful of distinct arguments
def split(n: int, parts: int, align: int = 1) -> tuple[tuple[int, int], ...]:
    """n items into `parts` contiguous ranges, boundaries on multiples of align; empty ranges dropped."""
    units = -(-n // align)
    bounds = [min(n, (units * i // parts) * align) for i in range(parts + 1)]
    return tuple((a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a)


class CpuMatrix:
    """W [rows, in] as GGUF rows (uint8 [rows, row_bytes], usually a view of the file map)."""

    def __init__(self, raw: np.ndarray, qtype, in_features: int):
        if not supported(qtype, in_features):
            raise ValueError(f"no CPU kernel for {getattr(qtype, 'name', qtype)} rows of {in_features}")
        self.kind = BLOCKS[qtype]
        self.kernel = MATMUL[qtype]
        self.raw = np.asarray(raw).reshape(-1)  # a plain ndarray: numba dispatches np.memmap slowly
        self.rows = raw.shape[0]
        self.in_features = in_features
        self.row_bytes = raw.shape[1]

    def quantize(self, x: np.ndarray) -> QuantizedActivations:
        """x float32 [T, in] in the activation form this weight type's kernel expects."""
        return quantize(x, self.kind.act_form)

    def rows_into(self, acts: QuantizedActivations, out: np.ndarray, start: int, stop: int) -> None:
        """out[:, start:stop] = acts @ W[start:stop].T, on the calling thread."""
        self.kernel(
            self.raw,
            start * self.row_bytes,
            self.row_bytes,
            stop - start,
            self.in_features // self.kind.values,
            acts.xq,
            acts.dx,
            acts.xs,
            acts.xf,
            0,
            acts.n_tokens,
            out,
            start,
            is_prompt(acts.n_tokens),
        )

    def __call__(self, executor: Executor | None, acts: QuantizedActivations) -> np.ndarray:
        """float32 [T, rows]; the rows are split over the workers unless the work is small."""
        if acts.width != self.in_features or acts.form != self.kind.act_form:
            raise ValueError(
                f"activations [{acts.n_tokens}, {acts.width}] in format {acts.form} for rows of {self.in_features} "
                f"that need format {self.kind.act_form}"
            )
        out = np.empty((acts.n_tokens, self.rows), np.float32)
        if _inline(executor, self.raw.nbytes, acts.n_tokens):
            self.rows_into(acts, out, 0, self.rows)
            return out
        ranges = split(self.rows, executor.n_threads, align=ROWS if self.kind.rows else 4)
        executor.run([lambda a=a, b=b: self.rows_into(acts, out, a, b) for a, b in ranges])
        return out


class CpuStack:
    """A stack of small matrices [E, rows, in] where slice e of the input meets matrix e."""

    def __init__(self, raw: np.ndarray, qtype, n: int, in_features: int):
        if not supported(qtype, in_features):
            raise ValueError(f"no CPU kernel for {getattr(qtype, 'name', qtype)} rows of {in_features}")
        self.kind = BLOCKS[qtype]
        self.kernel = MATMUL_STACK[qtype]
        self.raw = np.asarray(raw).reshape(-1)
        self.n, self.in_features = n, in_features
        self.row_bytes = raw.shape[-1]
        self.rows = raw.size // self.row_bytes // n

    def __call__(self, executor: Executor | None, x: np.ndarray, n_tok: int) -> np.ndarray:
        """x float32 [E * n_tok, in] (matrix-major) -> float32 [n_tok, E * rows]."""
        acts = quantize(x, self.kind.act_form)
        out = np.empty((n_tok, self.n * self.rows), np.float32)
        n_blocks = self.in_features // self.kind.values

        def run(first, stop):
            self.kernel(self.raw, self.row_bytes, self.rows, n_blocks, first, stop,
                        acts.xq, acts.dx, acts.xs, acts.xf, n_tok, out, is_prompt(n_tok))  # fmt: skip

        if _inline(executor, self.raw.nbytes, n_tok):
            run(0, self.n)
        else:
            executor.run([lambda a=a, b=b: run(a, b) for a, b in split(self.n, executor.n_threads)])
        return out
