"""`hetero chat` in a real pseudo-terminal, and the pieces it is made of."""

import sys

import pexpect
import pytest

from hetero.conversation import ThinkSplitter


def test_chat_in_a_terminal(synth):
    path = synth("tiny", "Q4_K_M")
    cmd = [sys.executable, "-m", "cli.main", "chat", str(path), "--max-tokens", "40", "--seed", "1"]
    child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", timeout=120, dimensions=(40, 160))
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
