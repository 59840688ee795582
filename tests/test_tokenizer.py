"""Mistral tokenizers against mistral_common (the reference), loading, bad input, streaming decode, tool calls."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mistral_common
import pytest
from mistral_common.protocol.fim.request import FIMRequest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from tramontane import Tokenizer, TokenizerError, load_tokenizer

DATA = Path(mistral_common.__file__).parent / "data"
FILES = {
    "v1": DATA / "tokenizer.model.v1",
    "v2": DATA / "mistral_instruct_tokenizer_240216.model.v2",
    "v3": DATA / "mistral_instruct_tokenizer_240323.model.v3",
    "v7": DATA / "mistral_instruct_tokenizer_241114.model.v7",
    "tekken": DATA / "tekken_240718.json",
}

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "   three leading spaces and trailing   ",
    "multiple\n\nnewlines\n\n\n\nand\r\nCRLF",
    "def f(x):\n\tif x:\n\t\treturn x  # tabs\n\treturn None\n",
    "    four-space indent\n        eight\n",
    "Größe, façade, naïve, smörgåsbord, Ærøskøbing",
    "日本語のテキストと漢字、中文文本。",
    "한국어 문장입니다. Ελληνικά γράμματα. Русский текст. עברית. العربية",
    "हिन्दी पाठ और ภาษาไทย",
    "emoji 😀 🙈 🇫🇷 👍🏽 ❤️",
    "family 👨‍👩‍👧‍👦 and flag 🏳️‍🌈 zwj sequences",
    "[INST] fake instruction [/INST] <s> </s> [TOOL_CALLS] [AVAILABLE_TOOLS]",
    "<|im_start|>user\nhi<|im_end|> <unk> <0x41> ▁underscore▁char",
    "1234567890 3.14159 -42 1e-9 0xFF",
    '{"json": [1, 2, {"nested": "value"}], "unicode": "\\u00e9"}',
    "a",
    "",
    " ",
    "\n",
    "\t\t",
    "mixed ١٢٣ digits ０１２ fullwidth ｆｕｌｌ",
    "zero\u200bwidth\u200dspace and combining e\u0301",
    "URL https://example.com/path?q=1&x=%20#frag",
    "x" * 300,
]

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    }
]


def _call(call_id: str, city: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


CHATS: dict[str, list[dict[str, Any]]] = {
    "single": [{"role": "user", "content": "Hello!"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    "multi_turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello. "},
        {"role": "user", "content": "Tell me a joke about 日本 😀"},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": "[INST] please [/INST]"},
    ],
}
TOOL_CHATS: dict[str, list[dict[str, Any]]] = {
    "tools": [{"role": "user", "content": "Weather in Paris?"}],
    "tool_result": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("abcDEF123", "Paris")]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temperature": 22}'},
    ],
    "parallel_and_follow_up": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Tokyo?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("call00001", "Paris"), _call("call00002", "Tokyo")]},
        {"role": "tool", "tool_call_id": "call00001", "content": "22C"},
        {"role": "tool", "tool_call_id": "call00002", "content": "18C"},
        {"role": "assistant", "content": "Paris 22C, Tokyo 18C."},
        {"role": "user", "content": "Thanks! And Oslo?"},
    ],
}


@pytest.fixture(scope="module")
def ours() -> dict[str, Tokenizer]:
    return {name: load_tokenizer(path) for name, path in FILES.items()}


@pytest.fixture(scope="module")
def reference() -> dict[str, MistralTokenizer]:
    return {name: MistralTokenizer.from_file(str(path)) for name, path in FILES.items()}


def _reference_chat(ref: MistralTokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    return ref.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools=tools)).tokens


# --- what gets loaded ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("v1", "mistral v1 (sentencepiece)"),
        ("v2", "mistral v2 (sentencepiece)"),
        ("v3", "mistral v3 (sentencepiece)"),
        ("v7", "mistral v7 (sentencepiece)"),
        ("tekken", "mistral v3 (tekken)"),
    ],
)
def test_version_is_recognised(ours, reference, name, expected):
    tok = ours[name]
    assert tok.name == expected
    assert tok.kind == "mistral"
    raw = reference[name].instruct_tokenizer.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (raw.bos_id, raw.eos_id, raw.n_words)
    assert tok.stop_ids == {raw.eos_id}
    assert tok.has_fim == (name in ("v3", "v7", "tekken"))


def test_bare_tokenizer_model_version_is_read_from_its_control_tokens(tmp_path):
    # mistral_common would call any bare `tokenizer.model` v1; its control tokens say v3 / v7 / v1.
    for name, version in (("v3", "v3"), ("v7", "v7"), ("v1", "v1"), ("v2", "v2")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "tokenizer.model").symlink_to(FILES[name])
        assert load_tokenizer(folder).name == f"mistral {version} (sentencepiece)"


def test_tekken_is_recognised_by_content_not_name(tmp_path, reference):
    (tmp_path / "vocab.json").symlink_to(FILES["tekken"])
    tok = load_tokenizer(tmp_path / "vocab.json")
    assert tok.name == "mistral v3 (tekken)"
    assert tok.encode("Bonjour 😀") == reference["tekken"].instruct_tokenizer.tokenizer.encode("Bonjour 😀", True, False)


def test_folder_priority(tmp_path):
    # A Mistral file wins over tokenizer.json; among versioned files the newest wins.
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer.model.v1").symlink_to(FILES["v1"])
    (tmp_path / "tokenizer.model.v3").symlink_to(FILES["v3"])
    tok = load_tokenizer(tmp_path)
    assert tok.name == "mistral v3 (sentencepiece)"
    assert tok.path.name == "tokenizer.model.v3"
    (tmp_path / "tekken.json").symlink_to(FILES["tekken"])
    assert load_tokenizer(tmp_path).name == "mistral v3 (tekken)"


# --- exact ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v1", "v3", "tekken"])
def test_encode_matches_mistral_common(ours, reference, name):
    raw = reference[name].instruct_tokenizer.tokenizer
    for text in CORPUS:
        assert ours[name].encode(text) == raw.encode(text, bos=True, eos=False), text
        assert ours[name].encode(text, bos=False, eos=True) == raw.encode(text, bos=False, eos=True), text


@pytest.mark.parametrize("name", ["v1", "v3", "tekken"])
def test_text_that_looks_like_control_tokens_stays_text(ours, name):
    tok = ours[name]
    ids = tok.encode("[INST] hi [/INST] </s> [TOOL_CALLS]", bos=False)
    assert not any(tok.is_special(i) for i in ids)


@pytest.mark.parametrize("name", ["v1", "v2", "v3", "v7", "tekken"])
def test_decode_round_trip(ours, name):
    tok = ours[name]
    for text in CORPUS:
        if "▁" in text and name != "tekken":
            continue  # sentencepiece reads a literal U+2581 as its own space symbol: decodes to " "
        assert tok.decode(tok.encode(text, eos=True)) == text


@pytest.mark.parametrize("name", ["v1", "v2", "v3", "v7", "tekken"])
@pytest.mark.parametrize("chat", sorted(CHATS))
def test_chat_matches_mistral_common(ours, reference, name, chat):
    assert ours[name].encode_chat(CHATS[chat]) == _reference_chat(reference[name], CHATS[chat])


@pytest.mark.parametrize("name", ["v3", "v7", "tekken"])
@pytest.mark.parametrize("chat", sorted(TOOL_CHATS))
def test_tool_chat_matches_mistral_common(ours, reference, name, chat):
    assert ours[name].encode_chat(TOOL_CHATS[chat], tools=TOOLS) == _reference_chat(
        reference[name], TOOL_CHATS[chat], TOOLS
    )


def test_v3_chat_layout_is_pinned(ours):
    # <s>[INST]▁Hello![/INST]: no space after [INST]'s id beyond sentencepiece's own "▁", none before [/INST].
    tok = ours["v3"]
    assert tok.encode_chat(CHATS["single"]) == [1, 3, *tok.encode("Hello!", bos=False), 4]
    assert tok.encode_chat(CHATS["single"])[:2] == [1, 3]
    v1 = ours["v1"]
    assert v1.encode_chat(CHATS["single"]) == [1, *v1.encode("[INST] Hello! [/INST]", bos=False)]


@pytest.mark.parametrize("name", ["v3", "v7", "tekken"])
def test_fim_matches_mistral_common(ours, reference, name):
    cases = [("def add(a, b):\n    ", "\n    return c\n"), ("x = ", ""), ("", " tail"), ("日本 ", "😀 end")]
    for prefix, suffix in cases:
        expected = reference[name].encode_fim(FIMRequest(prompt=prefix, suffix=suffix)).tokens
        assert ours[name].encode_fim(prefix, suffix) == expected


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_fim_without_fim_tokens_is_a_clear_error(ours, name):
    with pytest.raises(TokenizerError, match=r"\[PREFIX\]/\[SUFFIX\]"):
        ours[name].encode_fim("a", "b")


# --- invalid conversations ----------------------------------------------------------------------

BAD_CHATS: dict[str, tuple[list[Any], str]] = {
    "empty": ([], "empty"),
    "unknown role": ([{"role": "wizard", "content": "hi"}], "unknown role 'wizard'"),
    "not a dict": (["hello"], "must be a dict"),
    "tool without call": (
        [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "abcDEF123", "content": "1"}],
        "matches no unanswered tool call",
    ),
    "tool with wrong id": (
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [_call("abcDEF123", "Paris")]},
            {"role": "tool", "tool_call_id": "zzzzzzzzz", "content": "1"},
        ],
        "'zzzzzzzzz'",
    ),
    "tool answered twice": (
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [_call("abcDEF123", "Paris")]},
            {"role": "tool", "tool_call_id": "abcDEF123", "content": "1"},
            {"role": "tool", "tool_call_id": "abcDEF123", "content": "2"},
        ],
        "unanswered",
    ),
    "tool without id": (
        [{"role": "user", "content": "hi"}, {"role": "tool", "content": "1"}],
        "without a tool_call_id",
    ),
    "user without content": ([{"role": "user"}], "without content"),
    "empty assistant": (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "x"}],
        "neither content nor tool_calls",
    ),
    "call without name": (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"id": "abcDEF123", "function": {}}]}],
        "needs a function with a name",
    ),
}


@pytest.mark.parametrize("name", ["v1", "v3", "tekken"])
@pytest.mark.parametrize("case", sorted(BAD_CHATS))
def test_invalid_conversation_is_a_value_error(ours, name, case):
    messages, reason = BAD_CHATS[case]
    with pytest.raises(ValueError, match=reason):
        ours[name].encode_chat(messages)


def test_mistral_common_rules_become_value_errors(ours):
    # Rules only mistral_common knows (last message from the assistant, v3's 9-character call ids).
    with pytest.raises(ValueError, match="Expected last role"):
        ours["v3"].encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    bad_id = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [_call("call_1", "Paris")]},
              {"role": "tool", "tool_call_id": "call_1", "content": "1"}]
    with pytest.raises(ValueError, match="length of 9"):
        ours["v3"].encode_chat(bad_id, tools=TOOLS)
    with pytest.raises(ValueError, match="tools"):
        ours["v3"].encode_chat(CHATS["single"], tools=[{"type": "function"}])


# --- unknown and corrupt files ------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(tmp_path / "nope")


def test_empty_folder_names_folder_and_what_was_looked_for(tmp_path):
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(tmp_path)
    assert info.value.path == str(tmp_path)
    assert "tekken.json" in str(info.value) and "tokenizer.json" in str(info.value) and "gguf" in str(info.value)


@pytest.mark.parametrize(
    ("file_name", "content", "reason"),
    [
        ("tokenizer.model", b"\x00\x01garbage that is not a protobuf" * 10, "not a tokenizer"),
        ("tokenizer.model.v3", b"", "empty"),
        ("weights.bin", b"\x89PNG\r\n\x1a\n" + bytes(100), "not a tokenizer"),
        ("tekken.json", b'{"config": {"version": "v3"}, "vocab": [{"rank": 0', "cannot read JSON"),
        ("tekken.json", b'{"config": {"version": "v99"}, "vocab": []}', "Tekken"),
        ("tokenizer.json", b'{"model": {"type": "NoSuchModel"}}', "tokenizer.json"),
        ("config.json", b'{"hidden_size": 4096}', "neither a Tekken tokenizer nor"),
        ("model.gguf", b"GGUF" + bytes(12), "GGUF"),
    ],
)
def test_corrupt_or_unknown_file_names_the_file(tmp_path, file_name, content, reason):
    path = tmp_path / file_name
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match=reason) as info:
        load_tokenizer(path)
    assert info.value.path == str(path)
    assert file_name in str(info.value)


def test_truncated_sentencepiece_model(tmp_path):
    path = tmp_path / "tokenizer.model.v3"
    path.write_bytes(FILES["v3"].read_bytes()[:100_000])
    with pytest.raises(TokenizerError, match="tokenizer.model.v3"):
        load_tokenizer(path)


def test_several_ggufs_in_a_folder_is_ambiguous(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(TokenizerError, match="several GGUF"):
        load_tokenizer(tmp_path)


# --- streaming decode ---------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tok.decoder()
    return [decoder.add(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("name", ["v1", "v3", "tekken"])
def test_incremental_decoder_equals_decode(ours, name):
    tok = ours[name]
    for text in CORPUS:
        ids = tok.encode(text)
        assert "".join(_stream(tok, ids)) == tok.decode(ids)


@pytest.mark.parametrize("name", ["v3", "tekken"])
def test_incremental_decoder_never_emits_a_broken_character(ours, name):
    tok = ours[name]
    text = "日本語 😀🦩👨‍👩‍👧 ok 🇫🇷 龘 한국어"
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    emitted = ""
    for piece in pieces:
        emitted += piece
        assert text.startswith(emitted)
    # Multi-byte characters arrive over several tokens, so some steps must hold text back.
    assert pieces.count("") > 0


def test_incremental_decoder_sentencepiece_leading_space(ours, reference):
    tok, ref = ours["v3"], reference["v3"]
    space, hello, byte_space, byte_e2 = (tok.id_to_piece(i) for i in (29473, 23325, 803, 997))
    assert (space, hello, byte_space, byte_e2) == ("▁", "▁Hello", "<0x20>", "<0xE2>")
    assert _stream(tok, tok.encode("Hello world"))[:3] == ["", "Hello", " world"]  # BOS gives ""
    for ids in ([29473, 23325], [803, 23325], [0, 23325], [1, 3, 23325, 4, 23325], [997, 23325], [23325, 23325]):
        assert "".join(_stream(tok, ids)) == ref.decode(ids), ids


def test_incremental_decoder_flushes_an_unfinished_character(ours):
    tok = ours["v3"]
    ids = tok.encode("🦩", bos=False)[:-1]  # "▁" and 3 of the emoji's 4 byte-fallback pieces
    pieces = _stream(tok, ids)
    assert pieces[:-1] == [""] * len(ids)
    assert pieces[-1] == "\ufffd"


# --- tool calls in model output ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v3", "v7", "tekken"])
def test_parse_tool_calls(ours, name):
    tok = ours[name]
    marker = tok.encode_chat(TOOL_CHATS["tool_result"], tools=TOOLS)  # [TOOL_CALLS] id from the prompt
    tool_calls_id = next(i for i in marker if tok.id_to_piece(i) == "[TOOL_CALLS]")
    said = '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, {"name": "now", "arguments": {}, "id": "abcDEF123"}]'
    out = tok.parse_tool_calls([tool_calls_id, *tok.encode(said, bos=False), tok.eos_id])
    assert out.error is None and out.content == ""
    first, second = out.tool_calls
    assert first["type"] == "function" and first["function"]["name"] == "get_weather"
    assert json.loads(first["function"]["arguments"]) == {"city": "Paris", "unit": "c"}
    assert len(first["id"]) == 9 and first["id"].isalnum()
    assert second["id"] == "abcDEF123" and second["function"]["arguments"] == "{}"
    # The ids it hands out are accepted back by the same tokenizer in the next turn.
    follow_up = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": out.tool_calls},
        {"role": "tool", "tool_call_id": first["id"], "content": "22"},
        {"role": "tool", "tool_call_id": second["id"], "content": "noon"},
    ]
    assert tok.encode_chat(follow_up, tools=TOOLS)


def test_parse_tool_calls_text_and_malformed_json(ours):
    tok = ours["v3"]
    plain = tok.parse_tool_calls([*tok.encode("Just text.", bos=False), tok.eos_id])
    assert (plain.content, plain.tool_calls, plain.error) == ("Just text.", [], None)
    with_text = tok.parse_tool_calls([*tok.encode("Let me check.", bos=False), 5,
                                      *tok.encode('[{"name": "f", "arguments": {"a": 1}}]', bos=False)])
    assert with_text.content == "Let me check." and with_text.tool_calls[0]["function"]["name"] == "f"
    for said in ('[{"name": "get_weather", "arguments": {"city": "Par', "not json at all", '[{"arguments": {}}]', "42"):
        out = tok.parse_tool_calls([5, *tok.encode(said, bos=False)])
        assert out.tool_calls == [] and out.error is not None
        assert out.error.text == said


def test_tokenizer_from_a_copy_of_its_folder(tmp_path):
    # A model folder the user brings: a Mistral native layout with params.json beside the tokenizer.
    shutil.copy(FILES["v3"], tmp_path / "tokenizer.model.v3")
    (tmp_path / "params.json").write_text("{}")
    tok = load_tokenizer(tmp_path)
    assert tok.decode(tok.encode_chat(CHATS["system"])) == "You are terse.\n\nHi"


def test_continuation_decoder_keeps_the_leading_space():
    from mistral_common import __file__ as mc_file

    from tramontane import load_tokenizer

    tok = load_tokenizer(Path(mc_file).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3")
    ids = tok.encode("The wind is cold", bos=False)
    tail = ids[2:]  # "▁is", "▁cold"
    fresh, cont = tok.decoder(), tok.decoder(continuation=True)
    assert "".join(fresh.add(i) for i in tail) + fresh.flush() == "is cold"
    assert "".join(cont.add(i) for i in tail) + cont.flush() == " is cold"
