"""Reading the user's messages: line editing, history and multi-line input on a terminal
(prompt_toolkit), plain lines from a pipe.

On a terminal Enter sends, Alt-Enter (or Esc then Enter) starts a new line, a paste keeps its
newlines, Up/Down and Ctrl-R search the history kept in $XDG_STATE_HOME/hetero/chat_history,
and Tab completes slash commands. Anywhere, a line ending in a backslash continues on the next
line, and a message may be wrapped in triple quotes to span lines (what a pipe can say).
"""

import os
import re
from collections.abc import Callable
from pathlib import Path

FENCE = '"""'
HISTORY_ENTRIES = 10_000  # kept, oldest dropped: the file is read whole at start


def history_path() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "hetero" / "chat_history"


def read_message(read_line: Callable[[str], str], prompt: str, more: str) -> str:
    """One message from read_line(prompt), joining continued or fenced lines with newlines.
    EOFError inside a fence ends the message there."""
    line = read_line(prompt)
    if line.strip().startswith(FENCE):
        body = [line.strip()[len(FENCE) :]]
        while not body[-1].rstrip().endswith(FENCE):
            try:
                body.append(read_line(more))
            except EOFError:
                return "\n".join(body)
        body[-1] = body[-1].rstrip()[: -len(FENCE)]
        return "\n".join(body).strip("\n")
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read_line(more))
    return "\n".join(lines)


class TerminalInput:
    """prompt_toolkit's line editor with a persistent history and slash-command completion."""

    def __init__(self, commands: list[str], history: Path | None = None, **session_options):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.completion import WordCompleter
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        history = history or history_path()
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            _trim(history, HISTORY_ENTRIES)
            store = FileHistory(str(history))
        except OSError:  # a read-only home: history for this session only
            store = InMemoryHistory()
        self.session = PromptSession(
            history=store,
            completer=WordCompleter(commands, sentence=True),
            complete_while_typing=False,
            enable_history_search=True,
            key_bindings=_newline_on_alt_enter(),
            **session_options,
        )

    def read_line(self, prompt: str) -> str:
        from prompt_toolkit.formatted_text import HTML

        return self.session.prompt(HTML(f"<b><ansicyan>{prompt}</ansicyan></b>"), multiline=False)


def _newline_on_alt_enter():
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _(event):
        event.current_buffer.insert_text("\n")

    return keys


def _trim(path: Path, entries: int) -> None:
    """Keep the newest `entries` of a prompt_toolkit history file (entries start with '# ')."""
    if not path.exists() or path.stat().st_size < 1 << 20:
        return
    text = path.read_text(errors="replace")
    starts = [m.start() for m in re.finditer(r"^# ", text, re.M)]
    if len(starts) > entries:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text[starts[-entries] :])
        os.replace(tmp, path)
