"""Opening files: split sets, bad files, metadata validation, header-only shape checks."""

import shutil
import struct

import pytest

import hetero
from modelfile.config import config_from_metadata
from modelfile.errors import HeteroError
from modelfile.families import DEEPSEEK2, family_of, validate_tensors
from modelfile.gguf_file import GGUFModelFile


def test_split_set_merges_tensors_and_finds_the_rest(synth):
    split = synth("tiny", "Q8_0", splits=3)
    f = GGUFModelFile(split)
    assert len(f.paths) == 3
    assert len(f.tensors) == len(GGUFModelFile(synth("tiny", "Q8_0")).tensors)
    later = split.with_name(split.name.replace("00001-of", "00002-of"))
    assert GGUFModelFile(later).paths == f.paths  # any member opens the whole set


def test_incomplete_split_set_names_the_missing_file(synth, tmp_path):
    split = synth("tiny", "Q8_0", splits=3)
    for p in GGUFModelFile(split).paths[:2]:
        shutil.copy(p, tmp_path / p.name)
    with pytest.raises(HeteroError, match="missing .*00003-of-00003.gguf"):
        GGUFModelFile(tmp_path / split.name)


def header(n_tensors: int, n_kv: int, rest: bytes = b"", version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + rest


HOSTILE = {
    "empty": (b"", "not a GGUF"),
    "zip": (b"PK\x03\x04 this is a zip file, not a model", "not a GGUF"),
    "only magic": (b"GGUF\x03\x00\x00\x00", "not a GGUF"),
    "version 1": (header(0, 0, version=1), "unsupported GGUF version 1"),
    "absurd counts": (header(2**60, 2**60), "absurd counts"),
    "key longer than file": (header(0, 1, struct.pack("<Q", 2**62)), "runs past the end"),
    "array of 2^60 strings": (
        header(0, 1, struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 2**60)),
        "claims 1152921504606846976 strings",
    ),
    "array of 2^60 floats": (
        header(0, 1, struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 6, 2**60)),
        "runs past the end",
    ),
    "tensor with 9 dims": (header(1, 0, struct.pack("<Q", 1) + b"t" + struct.pack("<I", 9)), "9 dimensions"),
    "unknown value type": (header(0, 1, struct.pack("<Q", 1) + b"k" + struct.pack("<I", 77)), "unknown value type 77"),
}


@pytest.mark.parametrize("content,message", list(HOSTILE.values()), ids=list(HOSTILE))
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(HeteroError, match=message):
        hetero.load_model(path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(HeteroError, match="no such file"):
        hetero.load_model(tmp_path / "nope.gguf")
    with pytest.raises(HeteroError, match="is not a file"):
        hetero.load_model(tmp_path)


def test_truncated_data_is_detected(synth, tmp_path):
    src = synth("tiny", "Q8_0")
    data = src.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) - 4096])
    with pytest.raises(HeteroError, match="truncated"):
        hetero.load_model(path)


def test_missing_key_is_named(synth):
    meta = dict(GGUFModelFile(synth("tiny", "F32")).metadata)
    del meta["deepseek2.attention.kv_lora_rank"]
    with pytest.raises(HeteroError, match="deepseek2.attention.kv_lora_rank"):
        config_from_metadata(meta)


def test_unsupported_architecture(synth):
    meta = dict(GGUFModelFile(synth("tiny", "F32")).metadata, **{"general.architecture": "llama"})
    with pytest.raises(HeteroError, match="unsupported architecture 'llama'"):
        family_of(meta)  # the one check, before any family's parser reads a key


def test_shape_mismatch_names_the_tensor(synth):
    f = GGUFModelFile(synth("tiny", "F32"))
    cfg = config_from_metadata(f.metadata)
    shapes = {n: t.shape for n, t in f.tensors.items()}
    shapes["blk.1.attn_kv_a_mqa.weight"] = (100, 256)
    with pytest.raises(HeteroError, match=r"blk.1.attn_kv_a_mqa.weight has shape \(100, 256\)"):
        validate_tensors(DEEPSEEK2, cfg, shapes)
    del shapes["blk.2.ffn_up_exps.weight"]
    shapes["blk.1.attn_kv_a_mqa.weight"] = f.tensors["blk.1.attn_kv_a_mqa.weight"].shape
    with pytest.raises(HeteroError, match="missing tensor blk.2.ffn_up_exps.weight"):
        validate_tensors(DEEPSEEK2, cfg, shapes)


def test_config_reads_every_v3_mechanism(synth):
    cfg = config_from_metadata(GGUFModelFile(synth("v3", "F32", n_layer=2)).metadata)
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.v_head_dim) == (
        512,
        256,
        64,
        32,
        64,
    )
    assert (cfg.gating, cfg.n_group, cfg.n_group_used, cfg.norm_topk, cfg.routed_scale) == ("sigmoid", 8, 4, True, 2.5)
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.yarn_orig_ctx) == ("yarn", 40.0, 4096)
    assert cfg.yarn_log_mul == pytest.approx(1.0) and cfg.split_kv_b and cfg.n_dense_lead == 1
