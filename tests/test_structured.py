"""Structured outputs: grammars built from response_format and forced tool calls, enforced row by row
inside the engine's batches (llguidance), with outputs checked by `jsonschema`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import mistral_common
import pytest
import torch
import transformers
from test_engine import Collector, run_all

from tramontane import load_model, load_tokenizer
from tramontane.engine import Engine, Request
from tramontane.engine.grammar import Vocabulary, response_format_grammar, tool_call_grammar
from tramontane.sampling import SamplingParams

from tiny import COMMON

V3 = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
GREEDY = SamplingParams(temperature=0)
SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Rome"]},
                                           "days": {"type": "integer", "minimum": 0, "maximum": 30},
                                           "sunny": {"type": "boolean"}},
          "required": ["city", "days", "sunny"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
             "additionalProperties": False}}}]


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(V3)


@pytest.fixture(scope="module")
def model(tok, tmp_path_factory):
    """A random tiny Mistral with the v3 tokenizer's vocabulary (whose free text is never JSON)."""
    config = transformers.MistralConfig(**{**COMMON, "vocab_size": tok.vocab_size}, sliding_window=None)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp("mistral-v3-vocab")
    hf.save_pretrained(folder)
    return load_model(folder)


def answers(model, tok, requests: list[Request], max_batch: int = 8) -> list[list[int]]:
    engine = Engine(model, tok, max_batch=max_batch, max_seq_len=256)
    sink = Collector()
    for r in requests:
        r.emit = sink
    run_all(engine, requests, sink)
    for r in requests:
        assert sink.events[r.id][-1].finish_reason in ("stop", "length"), sink.events[r.id][-1]
    return [sink.tokens(r.id) for r in requests]


def requests(tok, grammars: list[str | None], max_tokens: int = 60) -> list[Request]:
    prompts = [tok.encode(f"Question {i}: the weather?", bos=True) for i in range(len(grammars))]
    return [Request(p, max_tokens, emit=print, params=GREEDY, grammar=g) for p, g in zip(prompts, grammars)]


def test_batches_mix_constrained_and_free_rows(model, tok):
    schema = response_format_grammar(json_schema_format(SCHEMA))
    flags = {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3}
    anything = response_format_grammar(json_schema_format(flags))
    grammars = [schema, None, anything, schema, None]
    together = answers(model, tok, requests(tok, grammars))
    alone = [answers(model, tok, [r])[0] for r in requests(tok, grammars)]
    assert together == alone
    for tokens, grammar in zip(together, grammars):
        if grammar is None:
            continue
        body = [t for t in tokens if t not in tok.stop_ids]
        jsonschema.validate(json.loads(tok.decode(body)), SCHEMA if grammar == schema else flags)
    free = [t for tokens, g in zip(together, grammars) if g is None for t in tokens]
    with pytest.raises(json.JSONDecodeError):  # the random model's free text is no JSON: the grammar did it
        json.loads(tok.decode(free))


def v11_layout(tok):
    """The v3 vocabulary posing as a v11+ one: `[TOOL_CALLS]name[ARGS]{json}`, with an unused control
    token as [ARGS] (mistral_common ships no v11 tokenizer file)."""
    fake = copy.copy(tok)
    fake._args_id = next(i for i in range(tok.vocab_size) if tok.id_to_piece(i) == "[/AVAILABLE_TOOLS]")
    return fake


@pytest.mark.parametrize("layout", ["json list", "v11 args"])
@pytest.mark.parametrize("name", [None, "get_time"])
def test_forced_tool_calls_parse_and_validate(model, tok, name, layout):
    if layout == "v11 args":
        tok = v11_layout(tok)
    grammar = tool_call_grammar(tok, TOOLS, name)
    out = answers(model, tok, requests(tok, [grammar, None]))
    parsed = tok.parse_tool_calls(out[0])
    assert parsed.error is None and len(parsed.tool_calls) >= 1
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in parsed.tool_calls:
        fn = call["function"]
        assert name is None or fn["name"] == name
        jsonschema.validate(json.loads(fn["arguments"]), by_name[fn["name"]])


@pytest.mark.slow
def test_what_cannot_be_enforced_names_its_field(tok, smollm2_gguf_path):
    with pytest.raises(ValueError, match=r"^response_format\.type"):
        response_format_grammar({"type": "yaml"})
    with pytest.raises(ValueError, match=r"^response_format\.json_schema\.name"):
        response_format_grammar({"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    with pytest.raises(ValueError, match=r"^response_format\.json_schema:"):
        response_format_grammar({"type": "json_schema"})
    with pytest.raises(ValueError, match=r"^response_format\.json_schema\.schema"):
        response_format_grammar(json_schema_format([1, 2]))  # type: ignore[arg-type]
    broken = response_format_grammar(json_schema_format({"type": "object", "properties": {"a": {"$ref": "#/no"}}}))
    assert broken is not None
    with pytest.raises(ValueError, match=r"^response_format\.json_schema\.schema: cannot be enforced"):
        Vocabulary(tok, tok.vocab_size).check(broken, "response_format.json_schema.schema")
    smol = load_tokenizer(smollm2_gguf_path)
    with pytest.raises(ValueError, match=r"^tool_choice: .*no tool-call token"):
        tool_call_grammar(smol, TOOLS, None)
    assert response_format_grammar({"type": "text"}) is None and response_format_grammar(None) is None


def test_vocabulary_bytes_follow_the_tokenizer(tok):
    vocab = Vocabulary(tok, tok.vocab_size + 3)  # a model's embedding may be padded past the tokenizer
    ll = vocab._get()
    text = "Hello, world"
    ids = tok.encode(text, bos=False)
    assert ll.decode_bytes(ids).decode().strip() == text
    for special in (tok.eos_id, tok.bos_id, tok.vocab_size + 1):
        assert ll.is_special_token(special)
