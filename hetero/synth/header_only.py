"""Header-only GGUFs at full published size: every tensor declared, the data region left sparse.

A 400 GB DeepSeek-R1-shaped file costs a few MB of disk this way, so planning (which must never
read weight bytes) can be tested on the real shapes. Types follow llama.cpp's Q4_K_M recipe
closely enough for byte counts: Q4_K by default, Q6_K for the output head and for ffn_down and
attn_v_b on the "more bits" layers, Q8_0 where a row is not a multiple of 256, F32 for norms,
routers and biases. An expert mix (`UD-IQ1_S`, `Q4_K_M+IQ2_XS`...) puts the routed experts in its
types over that recipe, as the low-bit releases do: planning them is what their users need.
"""

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as T

from hetero.synth.presets import PRESETS, family_of
from hetero.synth.quantize import expert_mix, expert_type
from hetero.synth.writer import put_metadata
from modelfile.errors import HeteroError


def _more_bits(layer: int, n_layer: int) -> bool:
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def q4_k_m_type(name: str, shape: tuple[int, ...], n_layer: int) -> T:
    if len(shape) == 1 or "ffn_gate_inp" in name:
        return T.F32
    if name == "output.weight":
        return T.Q6_K
    if shape[-1] % 256:
        return T.Q8_0
    layer = int(name.split(".")[1]) if name.startswith("blk.") else 0
    if ("ffn_down" in name or "attn_v_b" in name or "attn_kv_b" in name) and _more_bits(layer, n_layer):
        return T.Q6_K
    return T.Q4_K


def mix_type(name: str, shape: tuple[int, ...], n_layer: int, quant: str) -> T:
    """The tensor's type in Q4_K_M or in an expert mix over Q4_K_M."""
    mix = expert_mix(quant) if quant != "Q4_K_M" else None
    if quant != "Q4_K_M" and (mix is None or mix[0] != "Q4_K_M"):
        raise HeteroError("--header-only writes llama.cpp's Q4_K_M type mix, or an expert mix over it "
                          "(e.g. UD-IQ1_S, Q4_K_M+IQ2_XS)")  # fmt: skip
    if mix is not None and "_exps." in name:
        return expert_type(name, shape, mix)
    return q4_k_m_type(name, shape, n_layer)


def write_header_only(path: str | Path, preset=PRESETS["r1"], splits: int = 1, quant: str = "Q4_K_M") -> list[Path]:
    """Write the file(s); returns their paths. The sparse data region reads as zeros."""
    mix_type("output.weight", (1, 256), 1, quant)  # refuses a mix it cannot write before any file exists
    family = family_of(preset)
    shapes = family.synth.shapes(preset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(path, family.architecture, split_max_tensors=-(-len(shapes) // splits) if splits > 1 else 0)
    put_metadata(w, preset, "header-only")
    for name, shape in shapes.items():
        qtype = mix_type(name, shape, preset.n_layer, quant)
        block, size = GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * size
        w.add_tensor_info(name, (*shape[:-1], shape[-1] // block * size), np.dtype(np.uint8), nbytes, qtype)
    files = w.format_shard_names(path)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    # Each file's data region: sized, never written (a hole in the file system).
    sizes = [sum(ti.nbytes + (-ti.nbytes) % w.data_alignment for ti in tensors.values()) for tensors in w.tensors]
    for fout, size in zip(w.fout, sizes, strict=True):
        fout.seek(fout.tell() + (-fout.tell()) % w.data_alignment + size)
        fout.truncate()
    w.close()
    return files
