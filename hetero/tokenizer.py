"""Tokenizer and chat formatting, both taken from the GGUF itself.

Tokenization is llama.cpp's (llama-cpp-python with the model loaded vocab-only: no weights are
read), so every tokenizer family GGUF supports works. Chat templates are Jinja programs shipped
inside downloaded files, so they render in an immutable sandbox.
"""

import contextlib
import os
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hetero.errors import HeteroError

# DeepSeek-V3/R1's chat format, used when a file carries no template.
FALLBACK_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages if m['role'] == 'system' %}{{ m['content'] }}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp logs to the C-level stderr; hide it while loading."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class Tokenizer:
    def __init__(self, path: Path, metadata: dict):
        import llama_cpp

        with quiet_stderr():
            try:
                self._llama = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
            except ValueError as e:
                raise HeteroError(f"{path}: llama.cpp could not load the vocabulary ({e})") from None
        self.bos_id = int(metadata.get("tokenizer.ggml.bos_token_id", -1))
        self.eos_id = int(metadata.get("tokenizer.ggml.eos_token_id", -1))
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", True))
        tokens = metadata.get("tokenizer.ggml.tokens") or []
        self.bos_text = tokens[self.bos_id] if 0 <= self.bos_id < len(tokens) else ""
        self.eos_text = tokens[self.eos_id] if 0 <= self.eos_id < len(tokens) else ""
        source = metadata.get("tokenizer.chat_template") or FALLBACK_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise HeteroError(f"{path}: chat template does not parse ({e})") from None
        self.eog_ids = {i for i in (self.eos_id, self._llama.token_eos()) if i >= 0}
        eot = self._llama._model.token_eot() if hasattr(self._llama._model, "token_eot") else -1
        if eot >= 0:
            self.eog_ids.add(eot)

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Text -> token ids; special-token text (like the chat markers) maps to its ids."""
        bos = self.add_bos if add_bos is None else add_bos
        return self._llama.tokenize(text.encode("utf-8"), add_bos=bos, special=special)

    def token_bytes(self, ids: list[int], special: bool = False) -> bytes:
        """Raw bytes of tokens (control tokens only if `special`); a character may span tokens."""
        return self._llama.detokenize(ids, special=special)

    def detokenize(self, ids: list[int]) -> str:
        return self.token_bytes(ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_text,
                eos_token=self.eos_text,
            )
        except TemplateError as e:
            raise HeteroError(f"chat template failed: {e}") from None


def _raise_template_error(message: str):
    raise TemplateError(message)
