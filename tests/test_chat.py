"""`hetero chat` in a real pseudo-terminal, and the pieces it is made of."""

import os
import re
import sys
import time

import pexpect
import pytest

from hetero.conversation import ThinkSplitter


def test_chat_in_a_terminal(synth, tmp_path):
    path = synth("tiny", "Q4_K_M")
    # replies of up to 400 tokens: the tiny model decodes ~500 tok/s, and a 40-token reply (80 ms)
    # could end before the Ctrl-C below reached it (CI lost that race twice in a row)
    cmd = [sys.executable, "-m", "cli.main", "chat", str(path), "--max-tokens", "400", "--seed", "1"]
    env = {**os.environ, "COLUMNS": "160", "LINES": "40", "XDG_STATE_HOME": str(tmp_path)}  # the terminal's size
    child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", timeout=120, dimensions=(40, 160), env=env)
    child.expect("you>")
    child.sendline("Hello! Who are you?")
    child.expect(r"reply \d+ tokens at [0-9.]+ tok/s")
    child.expect("you>")
    child.send("Two lines:\x1b\rthe second.\r")  # Alt-Enter starts a new line of the same message
    child.expect(r"reply \d+ tokens at [0-9.]+ tok/s")
    child.expect("you>")
    child.sendline("/stats")
    child.expect("2 replies; history 4 messages")
    child.expect("you>")
    # Ctrl-C stops a reply, not the program. A Ctrl-C byte that reaches the terminal while the
    # prompt still holds it in raw mode is input, not a signal (seen in CI), so the reply is
    # given a moment to start, and a reply that ends uninterrupted is asked again (3 tries)
    for _ in range(3):
        child.sendline("Tell me more, at length.")
        child.expect("assistant>")
        time.sleep(0.3)
        child.sendintr()
        if child.expect([r"\[interrupted\]", r"reply \d+ tokens at [0-9.]+ tok/s"]) == 0:
            break
        child.expect("you>")
    else:
        pytest.fail("Ctrl-C never interrupted a reply")
    child.expect("you>")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = (tmp_path / "hetero" / "chat_history").read_text()
    assert "+Two lines:\n+the second.\n" in history and "+Hello! Who are you?\n" in history


@pytest.mark.parametrize(
    "pieces,expected",
    [
        (["<think>", "hmm", "</think>", "Hi"], [("think", "hmm"), ("answer", "Hi")]),
        (["<thi", "nk>a", "b</th", "ink>c"], [("think", "a"), ("think", "b"), ("answer", "c")]),
        (["no tags <thx"], [("answer", "no tags <thx")]),
        # reasoning only opens the reply: a tag after answer text, or after the block, is text
        (["Hi <think>x</think> y"], [("answer", "Hi <think>x</think> y")]),
        (["Hi <thi", "nk>x"], [("answer", "Hi <thi"), ("answer", "nk>x")]),
        (["<think>a</think>b<think>c", "</think>"], [("think", "a"), ("answer", "b<think>c"), ("answer", "</think>")]),
        (["\n<think>a</think>b"], [("answer", "\n"), ("think", "a"), ("answer", "b")]),
    ],
)
def test_think_splitter(pieces, expected):
    s = ThinkSplitter()
    out = [p for piece in pieces for p in s.feed(piece)] + s.flush()
    assert out == expected


class FakeModel:
    """chat_prompt = 10 tokens per message; a 50-token context."""

    n_ctx = 50

    def chat_prompt(self, messages):
        return list(range(10 * len(messages)))


def test_history_is_trimmed_to_the_context_oldest_first():
    from hetero.conversation import Conversation

    conv = Conversation(system="be brief")
    for i in range(3):
        conv.turns += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    conv.turns.append({"role": "user", "content": "q3"})
    ids, dropped = conv.prompt_ids(FakeModel(), room_for_reply=10)
    assert dropped == 4 and len(ids) == 40  # system + q2 a2 q3
    assert [t["content"] for t in conv.turns] == ["q2", "a2", "q3"]


def test_piped_output_is_plain_text(synth):
    import subprocess

    path = synth("tiny", "Q4_K_M")
    args = [sys.executable, "-m", "cli.main", "chat", str(path), "--prompt", "hi", "--max-tokens", "6", "--seed", "2"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() and "\x1b[" not in r.stdout
    assert re.search(r"reply \d+ tokens at", r.stderr)


def lines(*items):
    """read_line for read_message: the given lines, then EOF."""
    it = iter(items)

    def read_line(_prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read_line


def test_multi_line_messages_from_any_input():
    from cli.chat_input import read_message

    assert read_message(lines("one line", "next"), "", "") == "one line"
    assert read_message(lines("first \\", "second\\", "third", "next"), "", "") == "first \nsecond\nthird"
    assert read_message(lines('"""def f():', "    return 1", '"""', "next"), "", "") == "def f():\n    return 1"
    assert read_message(lines('"""a one-line fence"""'), "", "") == "a one-line fence"
    assert read_message(lines('"""never closed', "x"), "", "") == "never closed\nx"  # EOF ends it


def test_the_terminal_editor_has_multi_line_history_and_completion(tmp_path):
    """prompt_toolkit driven by keystrokes: Alt-Enter makes a new line, Enter sends, the history
    survives the session (Up recalls it), slash commands complete."""
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from cli.chat import COMMANDS
    from cli.chat_input import TerminalInput, read_message

    history = tmp_path / "state" / "chat_history"
    with create_pipe_input() as keys:
        editor = TerminalInput(COMMANDS, history, input=keys, output=DummyOutput())
        keys.send_text("def f():\x1b\r    return 42\r")
        assert read_message(editor.read_line, "you> ", "...> ") == "def f():\n    return 42"
        keys.send_text("/stats\r")
        assert editor.read_line("you> ") == "/stats"
        found = editor.session.completer.get_completions(Document("/sta"), CompleteEvent(completion_requested=True))
        assert [c.text for c in found] == ["/stats"]
    with create_pipe_input() as keys:
        editor = TerminalInput(COMMANDS, history, input=keys, output=DummyOutput())
        keys.send_text("\x1b[A\x1b[A\r")  # two entries back: the message before /stats
        assert editor.read_line("you> ") == "def f():\n    return 42"
