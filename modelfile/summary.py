"""What a GGUF holds: parameter counts, active parameters per token, bytes by tensor kind."""

from collections import Counter

from modelfile.families import family_of
from modelfile.gguf_file import GGUFModelFile

KINDS = (
    ("routed experts", ("_exps.",)),
    ("shared experts", ("_shexp.",)),
    ("router", ("ffn_gate_inp.", "exp_probs_b.")),
    ("attention", ("attn_q", "attn_kv", "attn_k_b", "attn_v_b", "attn_k.", "attn_v.", "attn_output")),
    ("dense FFN", ("ffn_gate.", "ffn_up.", "ffn_down.")),
    ("norms", ("norm.",)),
    ("embedding", ("token_embd.",)),
    ("output head", ("output.",)),
)


def tensor_kind(name: str) -> str:
    for kind, markers in KINDS:
        if any(m in name for m in markers):
            return kind
    return "other"


def summarize(file: GGUFModelFile) -> dict:
    """A JSON-ready summary. Active parameters count one embedding row and A/E of each routed expert stack."""
    cfg = family_of(file.metadata).config(file.metadata)
    by_kind: dict[str, dict[str, int]] = {}
    types: Counter = Counter()
    total = active = 0
    for name, t in file.tensors.items():
        kind = tensor_kind(name)
        entry = by_kind.setdefault(kind, {"tensors": 0, "params": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["params"] += t.n_values
        entry["bytes"] += t.nbytes
        types[t.qtype.name] += 1
        total += t.n_values
        if kind == "routed experts":
            active += t.n_values * cfg.n_expert_used // cfg.n_expert
        elif kind == "embedding":
            active += cfg.n_embd
        else:
            active += t.n_values
    if "output.weight" not in file.tensors:  # tied head: the embedding matrix is read per token
        active += file.tensors["token_embd.weight"].n_values
    return {
        "path": str(file.paths[0]),
        "files": len(file.paths),
        "architecture": file.architecture,
        "name": file.get("general.name", ""),
        "layers": cfg.n_layer,
        "hidden": cfg.n_embd,
        "experts": f"{cfg.n_expert} routed (top-{cfg.n_expert_used}) + {cfg.n_expert_shared} shared",
        "vocab": cfg.n_vocab,
        "context": cfg.n_ctx_train,
        "total_params": total,
        "active_params_per_token": active,
        "file_bytes": file.total_bytes,
        "quant_types": dict(types.most_common()),
        "by_kind": by_kind,
    }
