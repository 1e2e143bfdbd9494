"""The native decode step (cpu_ops.decode) wired to a DeepSeek2 whose weights all run on the CPU engine."""

import numpy as np
import torch

from cpu_ops import decode as native
from cpu_ops.blocks import BLOCKS
from cpu_ops.executor import Executor
from hetero.kv_cache import LatentKVCache
from hetero.models.deepseek2 import DeepSeek2
from hetero.ops import QuantLinear
from hetero.rope import rope_tables


def _on_engine(m) -> bool:
    return m is not None and getattr(m, "cpu", None) is not None


def eligible(net: DeepSeek2, executor: Executor | None) -> bool:
    """Every weight on the CPU engine, one NUMA node (the step reads the file map, not the
    per-node copies), activations on the CPU, and the split k_b/v_b layout."""
    if executor is None or executor.n_nodes != 1 or net.device.type != "cpu" or not net.cfg.split_kv_b:
        return False
    for layer in net.layers:
        if not layer.attention_on_cpu_engine:
            return False
        ffn = [layer.gate, layer.up, layer.down] if layer.gate is not None else []
        if layer.experts is not None:
            ffn += [layer.router, layer.experts]
        if not all(_on_engine(m) for m in ffn):
            return False
    return _on_engine(net.output)


class NativeDecode:
    """Decodes one token per call with `cpu_ops.decode.decode_token` on every worker."""

    def __init__(self, net: DeepSeek2, executor: Executor):
        c = net.cfg
        self.net, self.executor = net, executor
        rows: list[list[int]] = []
        params: list[np.ndarray] = []
        size = [0]  # floats in params so far

        def tensor(m) -> int:
            if m is None:
                return -1
            kind, width = BLOCKS[m.qtype], m.in_features
            # a QuantLinear3 stack [E, out, in] is addressed as E * out rows
            n_rows = m.out_features if isinstance(m, QuantLinear) else m.n * m.out_features
            row_bytes = width // kind.values * kind.nbytes
            rows.append([m.raw.data_ptr(), kind.code, n_rows, width, row_bytes, kind.values, kind.act_group])
            return len(rows) - 1

        def param(v: torch.Tensor | None) -> int:
            if v is None:
                return -1
            params.append(v.detach().float().reshape(-1).numpy())
            size[0] += params[-1].size
            return size[0] - params[-1].size

        table = np.full((len(net.layers), native.LAYER_COLUMNS), -1, np.int64)
        for i, layer in enumerate(net.layers):
            t = table[i]
            t[native.Q], t[native.QA], t[native.QB] = tensor(layer.q), tensor(layer.q_a), tensor(layer.q_b)
            t[native.KVA], t[native.OUT] = tensor(layer.kv_a), tensor(layer.out)
            t[native.KB], t[native.VB] = tensor(layer.heads.k_b), tensor(layer.heads.v_b)
            t[native.GATE], t[native.UP], t[native.DOWN] = tensor(layer.gate), tensor(layer.up), tensor(layer.down)
            if layer.experts is not None:
                bank = layer.experts
                t[native.ROUTER] = tensor(layer.router)
                t[native.GATE_E], t[native.UP_E] = tensor(bank.gate), tensor(bank.up)
                t[native.DOWN_E] = tensor(bank.down)
            t[native.ATTN_NORM], t[native.KV_NORM] = param(layer.attn_norm), param(layer.kv_a_norm)
            t[native.QA_NORM], t[native.FFN_NORM] = param(layer.q_a_norm), param(layer.ffn_norm)
            t[native.BIAS] = param(layer.router_bias)
        cfg = np.zeros(native.N_CONFIG, np.int64)
        cfg[native.C_EMBD], cfg[native.C_HEAD] = c.n_embd, c.n_head
        cfg[native.C_NOPE], cfg[native.C_ROPE], cfg[native.C_VDIM] = c.qk_nope_dim, c.qk_rope_dim, c.v_head_dim
        cfg[native.C_RANK], cfg[native.C_EXPERTS], cfg[native.C_USED] = c.kv_lora_rank, c.n_expert, c.n_expert_used
        cfg[native.C_SIGMOID] = c.gating == "sigmoid"
        cfg[native.C_GROUPS], cfg[native.C_GROUPS_USED] = c.n_group, c.n_group_used
        cfg[native.C_NORM_TOPK] = c.norm_topk
        cfg[native.C_OUTPUT], cfg[native.C_OUTPUT_NORM] = tensor(net.output), param(net.output_norm)
        cfg[native.C_FF_EXPERT] = c.n_ff_expert
        self.tensors, self.layers, self.cfg = np.array(rows, np.int64), table, cfg
        self.params = np.concatenate(params).astype(np.float32)
        self.floats = (float(c.rms_eps), float(net.kq_scale), float(c.routed_scale))

        ff = max([c.n_ff_expert, *(layer.gate.out_features for layer in net.layers if layer.gate is not None)])
        q_width = c.n_head * (c.qk_nope_dim + c.qk_rope_dim)
        self.barrier = np.zeros(32, np.int64)
        self.q = np.empty(q_width, np.float32)
        self.kv = np.empty(c.kv_lora_rank + c.qk_rope_dim + (c.q_lora_rank or 0), np.float32)
        self.ov = np.empty(c.n_head * c.v_head_dim, np.float32)
        self.tmp = np.empty(c.n_embd, np.float32)
        self.router = np.empty(max(c.n_expert, 1), np.float32)
        self.h = np.empty((c.n_expert_used + 1, ff), np.float32)
        self.logits = np.empty(net.output.out_features, np.float32)

    def __call__(self, token: int, cache: LatentKVCache) -> torch.Tensor:
        """Logits [1, vocab] of `token` at position cache.length; its cache row is written."""
        net, pos = self.net, cache.length
        x = net.embed(torch.tensor([token]))[0].float().numpy()
        cos, sin = (t[0].numpy() for t in rope_tables(net.cfg, torch.tensor([pos])))
        kv_cache = cache.buf.numpy()
        n = self.executor.n_threads
        buffers = (self.q, self.kv, self.ov, self.tmp, self.router, self.h, self.logits)
        args = (n, self.barrier, self.tensors, self.layers, self.params, self.cfg, *self.floats,
                x, kv_cache, pos, cos, sin, *buffers)  # fmt: skip
        self.executor.run([lambda k=k: native.decode_token(k, *args) for k in range(n)])
        cache.length = pos + 1
        return torch.from_numpy(self.logits.copy())[None]


def native_decode(net: DeepSeek2, executor: Executor | None) -> NativeDecode | None:
    return NativeDecode(net, executor) if eligible(net, executor) else None
