"""`hetero chat` in a real pseudo-terminal, and the pieces it is made of."""

import os
import re
import sys

import pexpect
import pytest

from hetero.conversation import ThinkSplitter


def test_chat_in_a_terminal(synth):
    path = synth("tiny", "Q4_K_M")
    cmd = [sys.executable, "-m", "cli.main", "chat", str(path), "--max-tokens", "40", "--seed", "1"]
    env = {**os.environ, "COLUMNS": "160", "LINES": "40"}  # the terminal's size, not the test runner's
    child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", timeout=120, dimensions=(40, 160), env=env)
    child.expect("you>")
    child.sendline("Hello! Who are you?")
    child.expect(r"reply \d+ tokens at [0-9.]+ tok/s")
    child.expect("you>")
    child.sendline("/stats")
    child.expect("1 replies; history 2 messages")
    child.expect("you>")
    child.sendline("Tell me more, at length.")
    child.expect("assistant>")
    child.sendintr()  # Ctrl-C: stops this reply, not the program
    child.expect(r"\[interrupted\]")
    child.expect("you>")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize(
    "pieces,expected",
    [
        (["<think>", "hmm", "</think>", "Hi"], [("think", "hmm"), ("answer", "Hi")]),
        (["<thi", "nk>a", "b</th", "ink>c"], [("think", "a"), ("think", "b"), ("answer", "c")]),
        (["no tags <thx"], [("answer", "no tags <thx")]),
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
