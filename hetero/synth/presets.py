"""Every family's synthetic presets by name (each family's entry holds its own: modelfile/families.py)."""

from dataclasses import fields, replace

from modelfile.families import FAMILIES, Family

PRESETS = {name: p for f in FAMILIES.values() if f.synth for name, p in f.synth.presets.items()}
HEADER_ONLY = {name for f in FAMILIES.values() if f.synth for name in f.synth.header_only}


def make_preset(name: str, **overrides):
    """The named preset with some fields replaced (None: keep the preset's)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[name]
    unknown = set(overrides) - {f.name for f in fields(preset)}
    if unknown:
        raise ValueError(f"unknown preset fields: {', '.join(sorted(unknown))}")
    return replace(preset, **{k: v for k, v in overrides.items() if v is not None})


def family_of(preset) -> Family:
    """The family a preset object belongs to."""
    for family in FAMILIES.values():
        if family.synth and any(type(p) is type(preset) for p in family.synth.presets.values()):
            return family
    raise TypeError(f"no family has presets of type {type(preset).__name__}")
