"""llama.cpp's intermediate tensors for one prompt, read through its graph-evaluation callback.

llama.cpp names the tensors of its graph ("attn_norm-3", "ffn_out-3", "result_norm", ...; a
repeated name gets a quote appended here) and, given a callback (`cb_eval`), shows each one
after computing it. The callback receives a `struct ggml_tensor *`, whose layout ggml has kept
since 2023 (GGML_MAX_SRC 10, 64-byte op params, 64-byte name); `llama_tensors` checks that
what it read is the embedding the file holds, so a changed layout fails loudly instead of
comparing garbage.
"""

import ctypes

import numpy as np
import torch

from hetero.synth.llama_cpp import quiet_stderr


class GgmlTensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _read(t: GgmlTensor) -> np.ndarray:
    """A float32 tensor's values, [ne3, ne2, ne1, ne0], through its byte strides (views too)."""
    base = np.ctypeslib.as_array(ctypes.cast(t.data, ctypes.POINTER(ctypes.c_float)), shape=(1,))
    shape, strides = tuple(t.ne)[::-1], tuple(t.nb)[::-1]
    return np.array(np.lib.stride_tricks.as_strided(base, shape=shape, strides=strides))


def llama_tensors(path, ids: list[int], model) -> dict[str, np.ndarray]:
    """Every float32 tensor llama.cpp computes for the prompt `ids` in one batch (CPU, float32
    KV cache, no flash attention, as tests/conftest.llama_logits), by name. `model`: hetero's
    model of the same file, whose embedding checks the read."""
    from conftest import oracle

    llama_cpp = oracle()
    from llama_cpp import _internals

    got: dict[str, np.ndarray] = {}

    def seen(tensor, ask, _user):
        t = ctypes.cast(tensor, ctypes.POINTER(GgmlTensor)).contents
        if ask or t.type != 0:  # ask: "do you want it?" (yes, all); type 0: float32
            return True
        name = t.name.decode()
        while name in got:
            name += "'"
        got[name] = _read(t)
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(seen)
    plain_init = _internals.LlamaContext.__init__

    def init(self, *, model, params, verbose=True):  # the high-level API builds the context params itself
        params.cb_eval = callback
        plain_init(self, model=model, params=params, verbose=verbose)

    _internals.LlamaContext.__init__ = init
    try:
        with quiet_stderr():
            f32 = llama_cpp.GGML_TYPE_F32
            llm = llama_cpp.Llama(
                str(path), n_ctx=max(64, len(ids)), n_batch=max(64, len(ids)), n_threads=2, verbose=False,
                type_k=f32, type_v=f32, flash_attn=False, logits_all=True,
            )  # fmt: skip
            try:
                llm.eval(ids)
            finally:
                llm.close()
    finally:
        _internals.LlamaContext.__init__ = plain_init
    with torch.inference_mode():
        ours = model.net.embed(torch.as_tensor(ids)).numpy()
    assert "embd" in got and np.array_equal(got["embd"].reshape(ours.shape), ours), "ggml_tensor layout changed?"
    return got
