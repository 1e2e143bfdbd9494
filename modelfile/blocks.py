"""The one description of a model: its layers as a list of pre-norm residual blocks.

Every block does x = x + body(rms_norm(x, norm)); a block's kind names the body, and its
`weights` map the roles that kind reads to the file's tensor names. A family writes this
list once (modelfile/families.py), and every way of running the model derives from it:

- the eager torch forward (hetero/models/net.py) runs the blocks in order;
- the hybrid decode step (hetero/models/hybrid.py) runs the same blocks on fixed buffers and
  cuts its CUDA-graph segments wherever a block hands its routed experts to the CPU engine;
- the native CPU step (hetero/models/native.py) turns the list into a program table whose
  columns are generated from the roles below, and cpu_ops/decode.py interprets it.

So dropping or reordering a block changes all three together (tests/test_description.py).

Kinds and their roles. Matrices are multiplied by the block's input; vectors are norms and
biases; a role the file lacks (q_a on V2-Lite, the selection bias on V2) is left out.
  mla: multi-head latent attention over the latent KV cache (DeepSeek-V2/V3, Kimi-K2)
  mlp: the gated SiLU MLP, down(silu(gate(h)) * up(h))
  moe: the router, the routed expert stacks and the shared experts (an mlp beside them)
"""

from dataclasses import dataclass, field

MATRICES = {
    "mla": ("q", "q_a", "q_b", "kv_a", "k_b", "v_b", "kv_b", "out"),
    "mlp": ("gate", "up", "down"),
    "moe": ("router", "gate_exps", "up_exps", "down_exps", "gate", "up", "down"),
}
VECTORS = {"mla": ("q_a_norm", "kv_a_norm"), "mlp": (), "moe": ("bias",)}
STACKS = {"k_b", "v_b", "gate_exps", "up_exps", "down_exps"}  # roles holding [E, out, in] stacks
ATTENTION = {"mla"}  # kinds that own a layer of the KV cache


@dataclass(frozen=True)
class Block:
    kind: str  # a key of MATRICES
    layer: int  # the file's layer (blk.N) whose tensors it reads
    norm: str  # the input norm's tensor
    weights: dict[str, str] = field(default_factory=dict)  # role -> tensor name

    def __post_init__(self):
        unknown = set(self.weights) - set(MATRICES[self.kind]) - set(VECTORS[self.kind])
        if unknown:
            raise ValueError(f"{self.kind} block of layer {self.layer}: unknown roles {sorted(unknown)}")


@dataclass(frozen=True)
class Description:
    """A model: token embedding, the blocks in order, the output norm and head."""

    embedding: str
    blocks: tuple[Block, ...]
    output_norm: str
    output: str

    def cache_layers(self) -> list[int]:
        """For each block, its layer of the KV cache (attention blocks count up from 0; -1 otherwise)."""
        out, n = [], 0
        for b in self.blocks:
            out.append(n if b.kind in ATTENTION else -1)
            n += b.kind in ATTENTION
        return out

    def tensor_names(self) -> set[str]:
        """Every tensor the description reads."""
        names = {self.embedding, self.output_norm, self.output}
        for b in self.blocks:
            names |= {b.norm, *b.weights.values()}
        return names

    @property
    def n_cache_layers(self) -> int:
        return sum(b.kind in ATTENTION for b in self.blocks)
