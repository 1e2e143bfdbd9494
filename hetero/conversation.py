"""Chat state without any UI: the message history, fitting it into the context, and splitting
DeepSeek-R1's `<think>...</think>` reasoning from the answer as text streams in."""

from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class Conversation:
    system: str = ""
    turns: list[dict] = field(default_factory=list)  # alternating user / assistant messages

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def reset(self) -> None:
        self.turns.clear()

    def prompt_ids(self, model, room_for_reply: int) -> tuple[list[int], int]:
        """Token ids of the whole conversation, dropping the oldest exchanges until it leaves
        `room_for_reply` tokens of context; returns (ids, number of messages dropped)."""
        dropped = 0
        while True:
            ids = model.chat_prompt(self.messages())
            if len(ids) + room_for_reply <= model.n_ctx or len(self.turns) <= 1:
                break
            del self.turns[:2]  # the oldest user message and its reply
            dropped += 2
        if len(ids) + 1 > model.n_ctx:
            raise ValueError(f"the message alone takes {len(ids)} tokens, more than the {model.n_ctx}-token context")
        return ids, dropped


class ThinkSplitter:
    """Feed streamed text; get back ("think" | "answer", text) pieces. Reasoning is the one block
    that opens the reply, as R1 writes it and DeepSeek's API returns it: a <think> after answer
    text, or after the block closed, is answer text (a model may well write the tag itself).
    Tags split across pieces are held back until they are whole; the block's tags are not
    returned. Set `inside` when the prompt already opened the block."""

    def __init__(self):
        self.inside = False
        self.over = False  # the block closed or the answer began: tags are text from here on
        self.pending = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.pending += text
        out = []
        while not self.over:
            tag = THINK_CLOSE if self.inside else THINK_OPEN
            at = self.pending.find(tag)
            head = (
                self.pending[:at] if at >= 0 else self.pending[: len(self.pending) - _partial_suffix(self.pending, tag)]
            )
            if not self.inside and head.strip():  # the answer began without a block
                self.over = True
                break
            self._emit(out, head)
            self.pending = self.pending[len(head) :]
            if at < 0:
                return out
            self.pending = self.pending[len(tag) :]
            self.over, self.inside = self.inside, not self.inside
        self._emit(out, self.pending)
        self.pending = ""
        return out

    def flush(self) -> list[tuple[str, str]]:
        out = []
        self._emit(out, self.pending)
        self.pending = ""
        return out

    def _emit(self, out: list, text: str) -> None:
        if text:
            out.append(("think" if self.inside else "answer", text))


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
