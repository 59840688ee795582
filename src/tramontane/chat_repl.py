"""The terminal chat behind `tramontane chat`: streamed answers, history, slash commands, Ctrl-C.

Input: a line is a message; end a line with a backslash to continue on the next one, or type three
double quotes alone on a line to start and end a block of several lines.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from .model import Transformer
from .sampling import SamplingParams
from .textgen import stream_text

HELP = """commands:
  /reset          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt and start over (/system alone removes it)
  /help           this help
  /exit           leave (Ctrl-D works too)
a line ending with \\ continues on the next line; \"\"\" on its own line starts/ends a multi-line message.
Ctrl-C stops an answer; Ctrl-C twice at the prompt leaves."""


class ChatSession:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Any,
        *,
        system: str | None = None,
        max_tokens: int = 512,
        seed: int | None = None,
        sampling: dict[str, Any] | None = None,
        out: TextIO | None = None,
        read: Callable[[str], str] = input,
        speculative: str | Transformer | None = None,
        draft_tokens: int = 8,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.max_tokens = max_tokens
        self.seed = seed
        self.params = SamplingParams(**(sampling or {}))
        self.out = out or sys.stdout
        self.read = read
        self.speculative = speculative  # "ngram" or a draft model: speculative decoding (generate.stream)
        self.draft_tokens = draft_tokens
        self.history: list[dict[str, str]] = []
        args = model.args
        # A sliding-window model can attend over any length, but its context is still what it was trained on.
        self.context = args.max_seq_len or 4096

    # ------------------------------------------------------------------ conversation
    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def prompt_ids(self) -> list[int]:
        """The conversation's prompt, dropping the oldest turns while it does not fit the context."""
        dropped = 0
        while True:
            ids: list[int] = self.tokenizer.encode_chat(self.messages())
            if len(ids) + self.max_tokens <= self.context or len(self.history) <= 1:
                break
            # drop the oldest user turn and the answer that followed it
            cut = next((i for i in range(1, len(self.history)) if self.history[i]["role"] == "user"),
                       len(self.history) - 1)
            del self.history[:cut]
            dropped += cut
        if dropped:
            self.say(f"[dropped the {dropped} oldest message(s) to fit the {self.context}-token context]")
        if len(ids) >= self.context:
            raise ValueError(f"the message is {len(ids)} tokens, more than the {self.context}-token context")
        return ids

    def answer(self, text: str) -> None:
        """Stream the model's answer to `text` and add both to the history."""
        self.history.append({"role": "user", "content": text})
        try:
            ids = self.prompt_ids()
        except ValueError as e:
            self.history.pop()
            self.say(f"[{e}]")
            return
        max_tokens = min(self.max_tokens, self.context - len(ids))
        pieces: list[str] = []
        n = 0
        t0 = time.perf_counter()
        first: float | None = None
        interrupted = False
        drafted = accepted = 0
        events = stream_text(self.model, self.tokenizer, [ids], max_tokens=max_tokens, params=self.params,
                             seed=self.seed, speculative=self.speculative, draft_tokens=self.draft_tokens)
        try:
            for ev in events:
                if ev.token is not None:
                    n += 1
                    first = first or time.perf_counter()
                drafted, accepted = drafted + ev.draft_tokens, accepted + ev.accepted_tokens
                pieces.append(ev.text)
                self.out.write(ev.text)
                self.out.flush()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            events.close()
        elapsed = time.perf_counter() - (first or t0)
        rate = (n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0
        note = "interrupted, " if interrupted else ""
        drafts = f", {accepted}/{drafted} drafted tokens accepted" if drafted else ""
        self.out.write(f"\n[{note}{n} tokens, {rate:.1f} tokens/s{drafts}]\n")
        self.out.flush()
        self.history.append({"role": "assistant", "content": "".join(pieces)})

    # ------------------------------------------------------------------ terminal loop
    def say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def read_message(self, interactive: bool) -> str:
        """One message; multi-line with a trailing backslash or a \"\"\" block. EOFError at the end."""
        prompt, more = ("> ", ". ") if interactive else ("", "")
        line = self.read(prompt)
        if line.strip() == '"""':
            lines = []
            while (nxt := self.read(more)).strip() != '"""':
                lines.append(nxt)
            return "\n".join(lines)
        lines = [line]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(self.read(more))
        return "\n".join(lines)

    def command(self, text: str) -> bool:
        """Run a slash command; False when the session should end."""
        name, _, arg = text.partition(" ")
        if name == "/exit" or name == "/quit":
            return False
        if name == "/reset":
            self.history.clear()
            self.say("[conversation cleared]")
        elif name == "/system":
            self.system = arg.strip() or None
            self.history.clear()
            self.say("[system prompt set, conversation cleared]" if self.system else "[system prompt removed]")
        elif name == "/help":
            self.say(HELP)
        else:
            self.say(f"[unknown command {name}; /help lists them]")
        return True

    def run(self, interactive: bool = True, title: str = "") -> int:
        if interactive:
            self.say(f"tramontane chat{' with ' + title if title else ''}: /help for commands, Ctrl-D to leave")
        armed = False  # a Ctrl-C at the prompt arms, a second one leaves
        while True:
            try:
                text = self.read_message(interactive)
            except EOFError:
                if interactive:
                    self.say("")
                return 0
            except KeyboardInterrupt:
                if armed:
                    self.say("")
                    return 0
                armed = True
                self.say("\n[Ctrl-C again or Ctrl-D to leave]")
                continue
            armed = False
            text = text.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return 0
                continue
            if not interactive:
                self.say(f"> {text}")
            try:
                self.answer(text)
            except KeyboardInterrupt:  # before the first token (while formatting or prefilling)
                if self.history and self.history[-1]["role"] == "user":
                    self.history.pop()
                self.say("\n[interrupted]")
