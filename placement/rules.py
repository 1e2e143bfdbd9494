"""User overrides: regular expressions on tensor names that pin tensors to a device (and format).

A TOML rules file:

    [[rule]]
    match = 'blk\\.(3|4)\\.ffn_.*_exps'   # re.search on the tensor name
    device = "gpu"                        # "gpu" | "cpu"
    format = "int4"                       # optional: checks the GPU format the type takes

and the command-line shorthand `--override 'exps=cpu'` (PATTERN=DEVICE[:FORMAT]), in the spirit
of llama.cpp's `-ot exps=CPU`. The first matching rule wins; command-line rules come first.
Formats are not converted: a GPU tensor takes its type's GPU format (int4 for Q4_K, int8 for
the other block types, floats as they are; a legacy joint attn_kv_b goes as a derived float16
stack plus its own blocks, f16+int8, and a rule names its blocks' part), and a rule's format,
when given, must name that one.
"""

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from modelfile.errors import HeteroError

DEVICES = ("gpu", "cpu")
GPU_FORMATS = ("int4", "int8", "f16", "bf16", "f32")  # CPU tensors keep their GGUF blocks


@dataclass(frozen=True)
class Rule:
    pattern: str
    device: str
    format: str | None
    source: str  # how the user wrote it, for error messages

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


def make_rule(pattern: str, device: str, fmt: str | None, source: str) -> Rule:
    device = device.lower()
    if device not in DEVICES:
        raise HeteroError(f"rule {source!r}: device must be gpu or cpu, not {device!r}")
    if fmt is not None and (device == "cpu" or fmt not in GPU_FORMATS):
        raise HeteroError(f"rule {source!r}: format {fmt!r} is not a GPU format ({', '.join(GPU_FORMATS)})")
    try:
        re.compile(pattern)
    except re.error as e:
        raise HeteroError(f"rule {source!r}: bad regular expression ({e})") from None
    return Rule(pattern, device, fmt, source)


def parse_override(text: str) -> Rule:
    """'exps=cpu' or 'blk\\.3\\..*=gpu:int8'."""
    pattern, sep, target = text.rpartition("=")
    if not sep or not pattern:
        raise HeteroError(f"override {text!r} should look like PATTERN=DEVICE, e.g. 'exps=cpu'")
    device, _, fmt = target.partition(":")
    return make_rule(pattern, device, fmt or None, text)


def load_rules(path: str | Path) -> list[Rule]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise HeteroError(f"rules file {path}: {e}") from None
    entries = data.get("rule", [])
    if not isinstance(entries, list):
        raise HeteroError(f"rules file {path}: 'rule' must be a list of tables ([[rule]] entries)")
    rules = []
    for i, entry in enumerate(entries):
        where = f"{path.name} rule {i + 1}"
        if not isinstance(entry, dict) or "match" not in entry or "device" not in entry:
            raise HeteroError(f"{where}: needs 'match' and 'device'")
        fmt = entry.get("format")
        rules.append(make_rule(str(entry["match"]), str(entry["device"]), None if fmt is None else str(fmt), where))
    return rules


def first_match(rules: list[Rule], name: str) -> Rule | None:
    return next((r for r in rules if r.matches(name)), None)
