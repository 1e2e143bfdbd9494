"""Write a synthetic GGUF: a family's real architecture (its entry's presets, metadata and
random weights: modelfile/families.py), a real tokenizer, random weights.

Tensors are streamed one by one (never the whole model in memory). Quantized files are written
by hetero's own numpy quantizer (hetero/synth/quantize.py: GGUF blocks, and the per-tensor types
of the mix), so no llama.cpp is needed; `quantizer="llama.cpp"` instead quantizes a float16
intermediate with llama.cpp's own quantizer (llama-cpp-python, the dev extra), whose rounding and
type choices are exactly llama.cpp's, for tests that compare with llama.cpp on its own files.
"""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from hetero.synth import llama_cpp
from hetero.synth.presets import HEADER_ONLY, family_of, make_preset
from hetero.synth.quantize import EXPERT_MIXES, MIXES, expert_mix, is_quant, quantize, tensor_type
from hetero.synth.vocab import CHAT_TEMPLATE, PAD, Vocab, build_vocab
from modelfile.errors import HeteroError
from modelfile.quants import row_bytes

FLOAT_TYPES = {"F32": GGMLQuantizationType.F32, "F16": GGMLQuantizationType.F16}
QUANT_FTYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S",
                "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS", "BF16")  # fmt: skip
QUANTS = (*FLOAT_TYPES, *QUANT_FTYPES)
QUANTIZERS = ("hetero", "llama.cpp")
_CHUNK = 1 << 22  # values quantized at a time: bounds the quantizer's temporaries


def write_synthetic(
    path: str | Path,
    preset: str = "tiny",
    quant: str = "F32",
    seed: int = 0,
    splits: int = 1,
    progress: Callable[[int, int], None] | None = None,
    quantizer: str = "hetero",
    **overrides,
) -> list[Path]:
    """Write the model; returns the file(s) written (several when `splits` > 1)."""
    if quant not in QUANTS and expert_mix(quant) is None:  # a malformed mix says what is wrong with it
        raise HeteroError(f"unknown quant {quant!r}; choose from {', '.join((*QUANTS, *EXPERT_MIXES))} "
                          "or an expert mix like Q4_K_M+IQ2_XS")  # fmt: skip
    if quantizer not in QUANTIZERS:
        raise HeteroError(f"unknown quantizer {quantizer!r}; choose from {', '.join(QUANTIZERS)}")
    p = make_preset(preset, **overrides)
    if preset in HEADER_ONLY:
        raise HeteroError(f"the {preset} preset is a full-size model; write it with --header-only")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if quantizer == "llama.cpp" and quant not in QUANTS:
        raise HeteroError(f"{quant} is an expert mix, which hetero's quantizer writes (--quantizer hetero)")
    if quantizer == "hetero" and quant not in FLOAT_TYPES and not is_quant(quant):
        raise HeteroError(
            f"hetero's quantizer writes {', '.join(MIXES)}; {quant} needs llama.cpp's "
            "(--quantizer llama.cpp, with pip install -e '.[dev]')"
        )
    with staging(path.parent) as stage:
        staged = stage / path.name
        if quant in FLOAT_TYPES:
            files = _write(staged, p, preset, _float_types(FLOAT_TYPES[quant]), seed, splits, progress)
        elif quantizer == "hetero":
            files = _write(staged, p, preset, lambda name, shape: tensor_type(name, shape, quant, p.n_layer,
                           p.n_expert), seed, splits, progress)  # fmt: skip
        else:
            source = stage / "f16.intermediate"
            _write(source, p, preset, _float_types(GGMLQuantizationType.F16), seed, 1, progress)
            target = stage / "q.intermediate" if splits > 1 else staged
            llama_cpp.quantize(source, target, quant)
            files = resplit(target, staged, splits) if splits > 1 else [staged]
        return [publish(f, path.parent) for f in files]


@contextlib.contextmanager
def staging(parent: Path):
    """A hidden folder beside the destination for files being written: an interrupted write
    leaves no partial file under the final name, and the folder goes with the process (on
    error or Ctrl-C at once; after a kill, the next writer in that folder removes it)."""
    for old in parent.glob(".hetero-write-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(dir=parent, prefix=f".hetero-write-{os.getpid()}-"))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(staged: Path, parent: Path) -> Path:
    """Move a finished file to its final name in one step, its bytes on disk first."""
    with open(staged, "rb") as f:
        os.fsync(f.fileno())
    final = parent / staged.name
    os.replace(staged, final)
    dir_fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def preset_config(p):
    """The config a preset's file will parse to."""
    return family_of(p).synth.config(p)


def put_metadata(
    w: GGUFWriter,
    p,
    name: str,
    vocab: Vocab | None = None,
    pre: str = "deepseek-v3",
    add_bos: bool | None = True,
    add_eos: bool | None = False,
) -> None:
    """The model's keys and its tokenizer (add_bos/add_eos None: the key left out)."""
    for key, value in family_of(p).synth.metadata(p, name).items():
        if key == "general.architecture":
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    vocab = vocab or build_vocab(p.n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    if PAD in vocab.tokens:
        w.add_pad_token_id(vocab.tokens.index(PAD))
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_eos is not None:
        w.add_add_eos_token(add_eos)
    w.add_chat_template(CHAT_TEMPLATE)


def _float_types(kind: GGMLQuantizationType) -> Callable[[str, tuple[int, ...]], GGMLQuantizationType]:
    """Matrices in `kind`; vectors and the router in F32, as converted checkpoints have them."""

    def type_of(name: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
        return GGMLQuantizationType.F32 if len(shape) == 1 or "ffn_gate_inp" in name else kind

    return type_of


_NUMPY_FLOAT = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


def _write(path, p, name: str, type_of, seed: int, splits: int, progress) -> list[Path]:
    family = family_of(p)
    cfg, shapes = family.synth.config(p), family.synth.shapes(p)
    types = {tname: type_of(tname, shape) for tname, shape in shapes.items()}
    w = GGUFWriter(path, family.architecture, split_max_tensors=-(-len(shapes) // splits) if splits > 1 else 0)
    put_metadata(w, p, name)
    for tname, shape in shapes.items():
        kind = types[tname]
        if kind in _NUMPY_FLOAT:
            dtype = np.dtype(_NUMPY_FLOAT[kind])
            w.add_tensor_info(tname, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        else:
            per_row = row_bytes(kind, shape[-1], tname)
            w.add_tensor_info(tname, (*shape[:-1], per_row), np.dtype(np.uint8), int(np.prod(shape[:-1])) * per_row,
                              raw_dtype=kind)  # fmt: skip
    files = w.format_shard_names(path)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = sum(int(np.prod(s)) for s in shapes.values())
    done = 0
    for tname, shape in shapes.items():
        values = family.synth.tensor(cfg, tname, shape, seed)
        w.write_tensor_data(_encode(values, types[tname]))
        done += int(np.prod(shape))
        if progress:
            progress(done, total)
    w.close()
    return files


def _encode(values: np.ndarray, kind: GGMLQuantizationType) -> np.ndarray:
    if kind in _NUMPY_FLOAT:
        return values.astype(_NUMPY_FLOAT[kind])
    rows = values.reshape(-1, values.shape[-1])
    step = max(1, _CHUNK // rows.shape[1])
    blocks = np.concatenate([quantize(rows[i : i + step], kind) for i in range(0, len(rows), step)])
    return blocks.reshape(*values.shape[:-1], -1)


def resplit(source: Path, target: Path, splits: int) -> list[Path]:
    """Copy a single-file GGUF into a split set `target-0000i-of-0000n.gguf`, bytes unchanged."""
    reader = GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    w = GGUFWriter(target, arch, split_max_tensors=-(-len(reader.tensors) // splits))
    copy_metadata(reader, w)
    for t in reader.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.n_bytes, GGMLQuantizationType(t.tensor_type))
    files = w.format_shard_names(target)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in reader.tensors:
        w.write_tensor_data(t.data)
    w.close()
    return files


def copy_metadata(reader: GGUFReader, w: GGUFWriter, skip=()) -> None:
    """Every key of `reader` into `w` with its own type, but the ones GGUFWriter writes itself
    (GGUF.*, general.architecture) and those in `skip`."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in skip:
            continue
        sub = field.types[-1] if len(field.types) > 1 else None
        w.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
