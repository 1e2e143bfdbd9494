"""The native decode step (cpu_ops.decode) for a net whose weights all run on the CPU engine.

The step's program is generated from the net's blocks: a row per block, its columns named by
the block vocabulary (cpu_ops.decode.COLUMNS), each role's op turned into a tensor-table row
(a matrix) or an offset into one float array (a norm or bias).
"""

import numpy as np
import torch

from cpu_ops import decode as native
from cpu_ops.blocks import BLOCKS
from cpu_ops.executor import Executor
from hetero.kv_cache import KVCache
from hetero.models.blocks import Mla, Moe
from hetero.models.net import Net
from hetero.ops import QuantLinear
from hetero.rope import rope_tables
from modelfile.blocks import MATRICES


def _on_engine(m) -> bool:
    return getattr(m, "cpu", None) is not None


def eligible(net: Net, executor: Executor | None) -> bool:
    """Every weight on the CPU engine, every block of a kind the step runs, one NUMA node (the
    step reads the file map, not the per-node copies), activations and a float32 cache on the
    CPU, and split k_b / v_b stacks (the file's, or derived from a joint kv_b at load)."""
    if executor is None or executor.n_nodes != 1 or net.device.type != "cpu" or net.cache_dtype != torch.float32:
        return False
    for block in net.blocks:
        if block.block.kind not in native.KINDS or (block.block.kind == "mla" and block.k_b is None):
            return False
        if not all(_on_engine(m) for m in block.matrix_ops()):
            return False
    return _on_engine(net.output)


class NativeDecode:
    """Decodes one token per call with `cpu_ops.decode.decode_token` on every worker."""

    def __init__(self, net: Net, executor: Executor):
        c = net.cfg
        self.net, self.executor = net, executor
        rows: list[list[int]] = []
        params: list[np.ndarray] = []
        size = [0]  # floats in params so far

        def tensor(m) -> int:
            kind, width = BLOCKS[m.qtype], m.in_features
            # a QuantLinear3 stack [E, out, in] is addressed as E * out rows
            n_rows = m.out_features if isinstance(m, QuantLinear) else m.n * m.out_features
            row_bytes = width // kind.values * kind.nbytes
            rows.append([m.raw.data_ptr(), kind.code, n_rows, width, row_bytes, kind.values, kind.act_form])
            return len(rows) - 1

        def param(v: torch.Tensor) -> int:
            params.append(v.detach().float().reshape(-1).numpy())
            size[0] += params[-1].size
            return size[0] - params[-1].size

        cols = native.COLUMNS
        self.program = np.full((len(net.blocks), len(cols)), -1, np.int64)
        for row, block in zip(self.program, net.blocks, strict=True):
            row[cols["kind"]] = native.KINDS.index(block.block.kind)
            row[cols["cache_layer"]] = block.cache_layer
            row[cols["norm"]] = param(block.norm)
            for role, op in block.ops.items():
                row[cols[role]] = tensor(op)
            for role, v in block.vectors.items():
                row[cols[role]] = param(v)
            if isinstance(block, Moe):
                bank = block.experts
                for role, stack in zip(MATRICES["moe"][1:4], (bank.gate, bank.up, bank.down), strict=True):
                    row[cols[role]] = tensor(stack)
        cfg = np.zeros(len(native.CONFIG), np.int64)
        for name in native.CONFIG_FIELDS:
            cfg[native.CONFIG[name]] = int(getattr(c, name))
        cfg[native.CONFIG["sigmoid"]] = c.gating == "sigmoid"
        cfg[native.CONFIG["output"]], cfg[native.CONFIG["output_norm"]] = tensor(net.output), param(net.output_norm)
        self.tensors, self.cfg = np.array(rows, np.int64), cfg
        self.params = np.concatenate(params).astype(np.float32)
        self.floats = (float(c.rms_eps), float(_kq_scale(net)), float(c.routed_scale))

        ff = max([c.n_ff_expert, *(b.gate.out_features for b in net.blocks if getattr(b, "gate", None) is not None)])
        q_width = c.n_head * (c.qk_nope_dim + c.qk_rope_dim)
        self.barrier = np.zeros(32, np.int64)
        self.q = np.empty(q_width, np.float32)
        self.kv = np.empty(c.kv_lora_rank + c.qk_rope_dim + (c.q_lora_rank or 0), np.float32)
        self.ov = np.empty(c.n_head * c.v_head_dim, np.float32)
        self.tmp = np.empty(c.n_embd, np.float32)
        self.router = np.empty(max(c.n_expert, 1), np.float32)
        self.h = np.empty((c.n_expert_used + 1, ff), np.float32)
        self.logits = np.empty(net.output.out_features, np.float32)

    def __call__(self, token: int, cache: KVCache) -> torch.Tensor:
        """Logits [1, vocab] of `token` at position cache.length; its cache rows are written."""
        net, pos = self.net, cache.length
        x = net.embed(torch.tensor([token]))[0].float().numpy()
        cos, sin = (t[0].numpy() for t in rope_tables(net.cfg, torch.tensor([pos])))
        n = self.executor.n_threads
        buffers = (self.q, self.kv, self.ov, self.tmp, self.router, self.h, self.logits)
        args = (n, self.barrier, self.tensors, self.program, self.params, self.cfg, *self.floats,
                x, cache.host_array(), pos, cos, sin, *buffers)  # fmt: skip
        self.executor.run([lambda k=k: native.decode_token(k, *args) for k in range(n)])
        cache.length = pos + 1
        return torch.from_numpy(self.logits.copy())[None]


def _kq_scale(net: Net) -> float:
    """The attention blocks' score scale (all MLA blocks of a net share it)."""
    scales = {b.kq_scale for b in net.blocks if isinstance(b, Mla)}
    return scales.pop() if scales else 1.0


def native_decode(net: Net, executor: Executor | None) -> NativeDecode | None:
    return NativeDecode(net, executor) if eligible(net, executor) else None
