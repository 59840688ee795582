"""Training data: JSONL records to token ids and a loss mask.

Three record shapes, one per line:
- `{"messages": [...], "tools": [...]}`: a chat as mistral-finetune and OpenAI write it (system, user,
  assistant, tool; `tool_calls`; an optional `"weight": 0 | 1` on assistant messages). Tokenized exactly
  as at inference (`Tokenizer.encode_chat_turns`: mistral_common, or the chat template); the loss covers
  each assistant answer of weight 1 with its end-of-turn token.
- `{"prompt": ..., "completion": ...}` (TRL): strings (the completion and EOS are trained), or lists of
  messages (a chat where only the completion's assistant messages are trained).
- `{"text": ...}`: plain text with BOS and EOS; every token is trained.

`mask[t]` says whether token t is a target, i.e. whether the loss scores predicting it from the tokens
before it (so the first token never is).

Example:
    >>> examples = load_examples("train.jsonl", tokenizer, max_tokens=2048)
    >>> sum(e.trained for e in examples)
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tokenizer import Tokenizer


class DataError(ValueError):
    """A training record that cannot be used; names the file, line (1-based) and field."""

    def __init__(self, path: str | Path, line: int, field: str, problem: str) -> None:
        super().__init__(f"{path}:{line}: {field}: {problem}")
        self.path, self.line, self.field, self.problem = Path(path), line, field, problem


@dataclass(frozen=True)
class Example:
    """One tokenized record: `tokens` and `mask` (True where the token is a target) of equal length."""

    tokens: list[int]
    mask: list[bool]
    source: str  # "file:line"

    @property
    def trained(self) -> int:
        return sum(self.mask)


def read_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of every non-blank line.

    Raises:
        DataError: a line is not JSON.
        FileNotFoundError: no such file.
    """
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, number, "<line>", f"not JSON ({exc.msg} at column {exc.colno})") from exc


def tokenize_record(record: Any, tokenizer: Tokenizer, path: str | Path = "<data>", line: int = 0) -> Example:
    """The tokens and loss mask of one record (see the module docstring).

    Raises:
        DataError: the record has no known shape or a bad field.
    """
    where = f"{path}:{line}"
    if not isinstance(record, Mapping):
        raise DataError(path, line, "<line>", f"a record must be a JSON object, got {type(record).__name__}")
    try:
        if "messages" in record:
            return _chat(record["messages"], record.get("tools"), tokenizer, path, line, "messages", None)
        if "prompt" in record or "completion" in record:
            return _prompt_completion(record, tokenizer, path, line)
        if "text" in record:
            text = record["text"]
            if not isinstance(text, str) or not text:
                raise DataError(path, line, "text", "must be a non-empty string")
            ids = tokenizer.encode(text, bos=True, eos=True)
            return Example(ids, [False] + [True] * (len(ids) - 1), where)
    except DataError:
        raise
    except ValueError as exc:  # the tokenizer's check of a conversation names the message
        raise DataError(path, line, "messages" if "messages" in record else "prompt", str(exc)) from exc
    raise DataError(path, line, "<line>", f"no 'messages', 'prompt'/'completion' or 'text' field "
                    f"(keys: {', '.join(sorted(map(str, record))) or 'none'})")


def _prompt_completion(record: Mapping[str, Any], tokenizer: Tokenizer, path: str | Path, line: int) -> Example:
    prompt, completion = record.get("prompt"), record.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str | list) or not value:
            raise DataError(path, line, name, "must be a non-empty string or list of messages")
    if isinstance(prompt, str) and isinstance(completion, str):
        head = tokenizer.encode(prompt, bos=True)
        tail = tokenizer.encode(completion, bos=False, eos=tokenizer.eos_id is not None)
        return Example(head + tail, [False] * len(head) + [True] * len(tail), f"{path}:{line}")
    if isinstance(prompt, list) and isinstance(completion, list):
        return _chat([*prompt, *completion], record.get("tools"), tokenizer, path, line, "prompt", len(prompt))
    raise DataError(path, line, "completion", "prompt and completion must both be strings or both lists of messages")


def _chat(messages: Any, tools: Any, tokenizer: Tokenizer, path: str | Path, line: int, name: str,
          first_trained: int | None) -> Example:
    """A conversation; assistant messages before index `first_trained` (if given) are not trained."""
    if not isinstance(messages, list) or not messages:
        raise DataError(path, line, name, "must be a non-empty list of messages")
    if tools is not None and not isinstance(tools, list):
        raise DataError(path, line, "tools", "must be a list of tools")
    weights: dict[int, int] = {}
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(path, line, f"{name}[{i}]", "must be an object")
        weight = message.get("weight", 1)
        if "weight" in message and message.get("role") != "assistant":
            raise DataError(path, line, f"{name}[{i}].weight", "only assistant messages have a weight")
        if weight not in (0, 1) or isinstance(weight, bool):
            raise DataError(path, line, f"{name}[{i}].weight", f"must be 0 or 1, got {weight!r}")
        weights[i] = 0 if first_trained is not None and i < first_trained else int(weight)
        clean.append({k: v for k, v in message.items() if k != "weight"})
    if not any(m.get("role") == "assistant" and weights[i] for i, m in enumerate(clean)):
        raise DataError(path, line, name, "no assistant message to train on (none, or all of weight 0)")
    tokens: list[int] = []
    mask: list[bool] = []
    for piece in tokenizer.encode_chat_turns(clean, tools):
        if piece.assistant is None:
            tokens += piece.ids
            mask += [False] * len(piece.ids)
            continue
        ids = list(piece.ids)
        ends = [j for j, t in enumerate(ids) if t in tokenizer.stop_ids]
        if ends:
            cut = ends[-1] + 1  # the end-of-turn token is trained; the template's text after it is not
        elif tokenizer.eos_id is not None:  # a template that writes no end of turn: teach the model to stop
            ids.append(tokenizer.eos_id)
            cut = len(ids)
        else:
            cut = len(ids)
        trained = bool(weights[piece.assistant])
        tokens += ids
        mask += [trained] * cut + [False] * (len(ids) - cut)
    if mask[:1] == [True]:
        mask[0] = False  # nothing comes before the first token to predict it from
    return Example(tokens, mask, f"{path}:{line}")


def load_examples(path: str | Path, tokenizer: Tokenizer, max_tokens: int | None = None) -> list[Example]:
    """Every record of a JSONL file, tokenized; longer ones cut to `max_tokens`.

    Raises:
        DataError: the first bad record (file, line, field), or a file with no records.
    """
    examples = [_cut(tokenize_record(rec, tokenizer, path, n), max_tokens) for n, rec in read_records(path)]
    if not examples:
        raise DataError(path, 0, "<file>", "no records")
    return examples


def _cut(example: Example, max_tokens: int | None) -> Example:
    if max_tokens is None or len(example.tokens) <= max_tokens:
        return example
    return Example(example.tokens[:max_tokens], example.mask[:max_tokens], example.source)


@dataclass
class DataReport:
    """What `check_data` found: counts, token lengths and every problem (one line each)."""

    path: Path
    records: int = 0
    lengths: list[int] = field(default_factory=list)
    trained_tokens: int = 0
    truncated: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.path}: {self.records} records, {len(self.lengths)} usable, {len(self.problems)} problems"]
        if self.lengths:
            lines.append(f"  tokens per example: min {min(self.lengths)}, mean {statistics.mean(self.lengths):.1f}, "
                         f"max {max(self.lengths)}; {sum(self.lengths)} in all, {self.trained_tokens} trained")
        if self.truncated:
            lines.append(f"  {self.truncated} examples longer than the limit would be cut")
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def check_data(path: str | Path, tokenizer: Tokenizer, max_tokens: int | None = None) -> DataReport:
    """Tokenize every record and report, without stopping at the first problem."""
    report = DataReport(Path(path))
    number = 0
    try:
        for number, record in read_records(path):
            report.records += 1
            try:
                example = tokenize_record(record, tokenizer, path, number)
            except DataError as exc:
                report.problems.append(str(exc))
                continue
            report.lengths.append(len(example.tokens))
            report.trained_tokens += example.trained
            if max_tokens is not None and len(example.tokens) > max_tokens:
                report.truncated += 1
    except DataError as exc:  # a line that is not JSON ends the file's reading
        report.records += 1
        report.problems.append(str(exc))
    if report.records == 0:
        report.problems.append(f"{path}: no records")
    return report
