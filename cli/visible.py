"""Text from a model or a user, made safe to show on a terminal.

A token can decode to an escape sequence (`\\x1b]0;...` retitles the window, `\\x1b[31m`
recolours it, `\\r` overwrites the line) and bidirectional overrides reorder what is shown, so
before text reaches a terminal every control character except newline and tab is written as a
visible escape. Text written to a pipe is left as it is: there it is data.
"""

import re

# C0 controls but \t and \n, DEL, C1 controls, and the bidirectional marks and overrides.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        text)  # fmt: skip
