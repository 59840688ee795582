"""Training data: ids equal mistral_common's and the chat template's inference encodings, the loss mask
is exactly the assistant answers (end of turn included, weight 0 left out), and bad records name
file:line:field."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import mistral_common
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from tramontane import load_tokenizer
from tramontane.finetune import DataError, check_data, load_examples, tokenize_record

DATA = Path(os.path.dirname(mistral_common.__file__)) / "data"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "abcdefghi", "content": "sunny, 21C"},
    {"role": "assistant", "content": "Sunny and 21 degrees.", "weight": 0},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]
PLAIN = [m for m in CHAT if m["role"] in ("user", "assistant") and "content" in m]  # v1 has no tools, no system


@functools.cache
def _tok(file: str | Path):
    return load_tokenizer(DATA / file)  # an absolute path stays itself


def _runs(tokens: list[int], mask: list[bool]) -> list[list[int]]:
    """The masked stretches of `tokens`."""
    runs: list[list[int]] = []
    for i, (t, m) in enumerate(zip(tokens, mask, strict=True)):
        if m:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(t)
    return runs


@pytest.mark.parametrize("file, tools", [("tokenizer.model.v1", False), ("mistral_instruct_tokenizer_240323.model.v3", True),
                                         ("tekken_240911.json", True)])
def test_mistral_chat_mask_is_the_assistant_turns(file: str, tools: bool) -> None:
    tok = _tok(file)
    messages = CHAT if tools else PLAIN
    record = {"messages": messages, **({"tools": TOOLS} if tools else {})}
    example = tokenize_record(record, tok, "train.jsonl", 1)

    reference = MistralTokenizer.from_file(str(DATA / file), mode=ValidationMode.finetuning)
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    request = ChatCompletionRequest.from_openai(clean, tools=TOOLS if tools else None)
    assert example.tokens == reference.encode_chat_completion(request).tokens  # as mistral_common encodes it

    raw = reference.instruct_tokenizer.tokenizer
    runs = _runs(example.tokens, example.mask)
    texts = [reference.decode(run, special_token_policy="keep") for run in runs]
    assert len(runs) == (2 if tools else 1)  # the weight-0 answer is not trained
    if tools:  # the tool call, as mistral_common writes it, then </s>
        assert texts[0].startswith("[TOOL_CALLS]") and '"get_weather"' in texts[0] and texts[0].endswith("</s>")
    answer = runs[-1]
    assert answer == raw.encode("You are welcome.", bos=False, eos=True) or (
        answer[-1] == raw.eos_id and raw.decode(answer[:-1]).strip() == "You are welcome.")
    assert all("Sunny" not in t for t in texts)


def test_mistral_weight_one_trains_every_answer() -> None:
    tok = _tok("tekken_240911.json")
    messages = [{k: v for k, v in m.items() if k != "weight"} for m in CHAT]
    runs = _runs(*_tm(tokenize_record({"messages": messages, "tools": TOOLS}, tok)))
    assert len(runs) == 3 and tok.decode(runs[1]).strip() == "Sunny and 21 degrees."


def _tm(example):
    return example.tokens, example.mask


def test_template_chat_prompts_are_the_inference_prompts(smollm2_gguf_path: Path) -> None:
    tok = _tok(smollm2_gguf_path)
    messages = [{"role": "user", "content": "Who is Zorblat?"}, {"role": "assistant", "content": "A purple wizard."},
                {"role": "user", "content": "Where does he live?"}, {"role": "assistant", "content": "On Mars."}]
    example = tokenize_record({"messages": messages}, tok)
    runs = _runs(example.tokens, example.mask)
    assert [tok.decode(r) for r in runs] == ["A purple wizard.", "On Mars."]
    assert all(r[-1] == tok.eos_id for r in runs)  # <|im_end|> is trained, the newline after it is not
    for i, run in zip((1, 3), runs, strict=True):
        prompt = tok.encode_chat(messages[:i])  # what generation is given before this answer
        assert example.tokens[: len(prompt)] == prompt
        assert example.tokens[len(prompt) : len(prompt) + len(run)] == run


def test_prompt_completion_and_text(smollm2_gguf_path: Path) -> None:
    tok = _tok(smollm2_gguf_path)
    pc = tokenize_record({"prompt": "The capital of France is", "completion": " Paris."}, tok)
    assert tok.decode([t for t, m in zip(*_tm(pc), strict=True) if m]) == " Paris." and pc.tokens[-1] == tok.eos_id
    chat = tokenize_record({"prompt": [{"role": "user", "content": "Hi"}],
                            "completion": [{"role": "assistant", "content": "Hello!"}]}, tok)
    assert [tok.decode(r) for r in _runs(*_tm(chat))] == ["Hello!"]
    text = tokenize_record({"text": "Once upon a time"}, tok)
    assert text.mask == [False] + [True] * (len(text.tokens) - 1)
    assert text.tokens == tok.encode("Once upon a time", bos=True, eos=True)


@pytest.mark.parametrize("line, field", [
    ("not json", "<line>"),
    ("[1, 2]", "<line>"),
    ('{"input": "x"}', "<line>"),
    ('{"text": ""}', "text"),
    ('{"messages": []}', "messages"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 2}]}',
     "messages[1].weight"),
    ('{"messages": [{"role": "user", "content": "hi", "weight": 1}, {"role": "assistant", "content": "yo"}]}',
     "messages[0].weight"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "messages"),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', "messages"),
    ('{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}', "completion"),
    ('{"prompt": "a"}', "completion"),
])
def test_bad_records_name_file_line_and_field(tmp_path: Path, line: str, field: str) -> None:
    tok = _tok("tekken_240911.json")
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path = tmp_path / "train.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(DataError) as info:
        load_examples(path, tok)
    assert str(info.value).startswith(f"{path}:3: {field}: ")
    assert info.value.line == 3 and info.value.field == field


def test_check_data_reports_counts_lengths_and_problems(tmp_path: Path) -> None:
    tok = _tok("tekken_240911.json")
    rows = [{"messages": [{"role": "user", "content": "hi " * n}, {"role": "assistant", "content": "yo"}]}
            for n in (1, 5, 40)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([*map(json.dumps, rows), '{"text": 3}']) + "\n")
    report = check_data(path, tok, max_tokens=30)
    assert report.records == 4 and len(report.lengths) == 3 and report.truncated == 1
    assert report.problems == [f"{path}:4: text: must be a non-empty string"]
    summary = report.summary()
    assert "4 records, 3 usable, 1 problems" in summary and f"max {max(report.lengths)}" in summary
