"""The terminal chat loop: streaming replies, R1 reasoning shown apart, slash commands, Ctrl-C."""

import sys
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape

from cli.chat_input import TerminalInput, read_message
from cli.visible import visible
from hetero.conversation import Conversation, ThinkSplitter
from hetero.sampling import sampling_problem

COMMANDS = ["/reset", "/system", "/temp", "/stats", "/exit"]
HELP = "/reset  /system TEXT  /temp X  /stats  /exit"
MULTILINE_HELP = 'Alt-Enter for a new line, or end a line with \\, or wrap a message in """'


@dataclass
class ChatOptions:
    max_tokens: int = 512
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int | None = None
    hide_thinking: bool = False


@dataclass
class Stats:
    replies: int = 0
    prompt_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    last_prompt_tokens: int = 0


class ChatUI:
    """Talks to a terminal with rich, or writes plain text when stdout is a pipe."""

    def __init__(self, console: Console):
        self.console = console
        self.rich = console.is_terminal
        self.err = Console(stderr=True)
        self._editor = None

    def ask(self) -> str:
        """The next message: edited with history on a terminal, read plainly from a pipe."""
        if self.rich and sys.stdin.isatty():
            if self._editor is None:
                self._editor = TerminalInput(COMMANDS)
            return read_message(self._editor.read_line, "you> ", "...> ")
        return read_message(lambda _: input(), "", "")

    def piece(self, kind: str, text: str) -> None:
        if not self.rich:
            sys.stdout.write(text)
            sys.stdout.flush()
        elif kind == "think":
            self.console.print(visible(text), style="dim italic", end="", markup=False, highlight=False)
        else:
            self.console.print(visible(text), end="", markup=False, highlight=False)

    def note(self, text: str) -> None:
        """Status lines: dim on a terminal, stderr in a pipe so stdout stays the model's text."""
        if self.rich:
            self.console.print(f"[dim]{escape(visible(text))}[/]", highlight=False, soft_wrap=True)
        else:
            self.err.print(text, highlight=False, soft_wrap=True, markup=False)


def reply(model, conv: Conversation, opts: ChatOptions, ui: ChatUI, stats: Stats) -> None:
    """Generate one answer to the conversation so far, streaming it; Ctrl-C cuts it short."""
    ids, dropped = conv.prompt_ids(model, room_for_reply=min(opts.max_tokens, model.n_ctx // 2))
    if dropped:
        ui.note(f"(history trimmed: dropped the {dropped} oldest messages to fit the {model.n_ctx}-token context)")
    splitter, shown, answer, last, tokens = ThinkSplitter(), False, [], None, 0
    if ui.rich:
        ui.console.print("[bold green]assistant>[/] ", end="")
    sampling = {"temperature": opts.temperature, "top_p": opts.top_p, "seed": opts.seed}
    interrupted = False
    try:
        for step in model.generate_steps(ids, opts.max_tokens, **sampling):
            last, tokens = step, tokens + (step.token >= 0)
            answer.append(step.text)
            for kind, text in splitter.feed(step.text):
                if kind == "think" and opts.hide_thinking:
                    if not shown:
                        ui.piece("think", "(thinking…) ")
                        shown = True
                    continue
                ui.piece(kind, text)
    except KeyboardInterrupt:
        interrupted = True
    for kind, text in splitter.flush():
        if not (kind == "think" and opts.hide_thinking):
            ui.piece(kind, text)
    ui.piece("answer", "\n")
    conv.turns.append({"role": "assistant", "content": "".join(answer)})
    if interrupted:
        ui.note("[interrupted]")
    if last is not None:
        stats.replies += 1
        stats.last_prompt_tokens = last.prompt_tokens
        stats.prompt_tok_s = last.prompt_tokens / last.prefill_s
        stats.decode_tok_s = (tokens - 1) / last.decode_s if tokens > 1 and last.decode_s > 0 else 0.0
        ui.note(
            f"prompt {last.prompt_tokens} tokens at {stats.prompt_tok_s:.1f} tok/s, "
            f"reply {tokens} tokens at {stats.decode_tok_s:.1f} tok/s"
        )


def command(line: str, conv: Conversation, opts: ChatOptions, ui: ChatUI, stats: Stats, model) -> bool:
    """Handle a slash command; returns False when the user wants to leave."""
    name, _, arg = line.strip().partition(" ")
    if name == "/exit":
        return False
    if name == "/reset":
        conv.reset()
        ui.note("history cleared")
    elif name == "/system":
        conv.system = arg
        ui.note(f"system prompt set ({len(arg)} characters)")
    elif name == "/temp":
        try:
            value = float(arg)
        except ValueError:
            ui.note(f"/temp needs a number, e.g. /temp 0.7 (got {arg!r})")
            return True
        problem = sampling_problem(value, opts.top_p)
        if problem:
            ui.note(problem.replace("--temperature", "/temp") + f"; still {opts.temperature}")
        else:
            opts.temperature = value
            ui.note(f"temperature {opts.temperature}")
    elif name == "/stats":
        ids = model.chat_prompt(conv.messages()) if conv.turns else []
        ui.note(
            f"{stats.replies} replies; history {len(conv.turns)} messages, {len(ids)} of {model.n_ctx} tokens; "
            f"last prompt {stats.prompt_tok_s:.1f} tok/s, last reply {stats.decode_tok_s:.1f} tok/s; "
            f"temperature {opts.temperature}"
        )
    else:
        ui.note(f"unknown command {name}; commands: {HELP}")
    return True


def run_chat(model, console: Console, opts: ChatOptions, system: str = "", prompt: str | None = None) -> None:
    ui, conv, stats = ChatUI(console), Conversation(system=system), Stats()
    if prompt is not None:
        conv.turns.append({"role": "user", "content": prompt})
        reply(model, conv, opts, ui, stats)
        return
    ui.note(
        f"chatting with {model.file.paths[0].name} ({model.n_ctx}-token context). {HELP}. "
        f"{MULTILINE_HELP}. Ctrl-C stops a reply, Ctrl-D leaves."
    )
    while True:
        try:
            line = ui.ask()
        except EOFError:
            break
        except KeyboardInterrupt:
            ui.piece("answer", "\n")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if not command(line, conv, opts, ui, stats, model):
                break
            continue
        conv.turns.append({"role": "user", "content": line})
        reply(model, conv, opts, ui, stats)
