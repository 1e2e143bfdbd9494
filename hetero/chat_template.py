"""The file's chat template: a Jinja program shipped inside a downloaded file, so it renders in an
immutable sandbox and its errors are one line."""

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


class ChatTemplate:
    def __init__(self, source: str | None, bos_text: str, eos_text: str, where: str = "the file"):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        try:
            self._template = env.from_string(source or FALLBACK_TEMPLATE)
        except TemplateError as e:
            raise HeteroError(f"{where}: chat template does not parse ({e})") from None
        self.bos_text, self.eos_text = bos_text, eos_text

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
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
