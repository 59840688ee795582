"""The text helpers lose no text: for every finish reason, the text is what the tokens decode to (minus a
matched stop string), in `complete`, `chat`, `stream_chat` and the CLI's `complete` (plain and --json)."""

from __future__ import annotations

import json

import pytest

from tramontane import chat, complete, load_model, load_tokenizer, stream_chat

from console import tramontane

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def decoded(tok, tokens: list[int], continuation: bool) -> str:
    """The tokens' text through a decoder of its own, fed at once and flushed."""
    dec = tok.decoder(continuation=continuation)
    return "".join(dec.add(t) for t in tokens) + dec.flush()


@pytest.fixture(scope="module")
def demo(smollm2_gguf_path):
    return load_model(smollm2_gguf_path), load_tokenizer(smollm2_gguf_path)


# greedy, the answer ends with the end-of-text token after 29 tokens: 32 covers that finish too
@pytest.mark.parametrize("max_tokens", [1, 2, 24, 32])
def test_complete_text_is_the_decoded_tokens(demo, max_tokens):
    model, tok = demo
    (done,) = complete(model, tok, [PROMPT], max_tokens=max_tokens, temperature=0)
    assert done.finish_reason == ("length" if len(done.tokens) == max_tokens else "stop")
    assert done.text == decoded(tok, done.tokens, True)
    assert done.text.strip()  # ' Paris' is the first token: never an empty answer


@pytest.mark.parametrize("max_tokens", [1, 2, 32])
def test_chat_and_stream_chat_text_is_the_decoded_tokens(demo, max_tokens):
    model, tok = demo
    (done,) = chat(model, tok, [QUESTION], max_tokens=max_tokens, temperature=0)
    assert done.text == decoded(tok, done.tokens, False)
    events = list(stream_chat(model, tok, QUESTION, max_tokens=max_tokens, temperature=0))
    assert "".join(e.text for e in events) == done.text
    assert [e.token for e in events if e.token is not None] == done.tokens


def test_text_before_a_stop_string_in_the_last_piece_is_kept(demo):
    model, tok = demo
    (free,) = complete(model, tok, [PROMPT], max_tokens=16, temperature=0)
    # a stop string that starts inside some token's text, after a part of that text worth keeping
    cut = free.text.index("France") if "France" in free.text else len(free.text) // 2
    stop = free.text[cut : cut + 3]
    (stopped,) = complete(model, tok, [PROMPT], max_tokens=16, stop=[stop], temperature=0)
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]


@pytest.mark.parametrize("max_tokens", [1, 32])
def test_cli_complete_prints_every_token(smollm2_gguf_path, demo, max_tokens):
    _, tok = demo
    args = ["complete", PROMPT, "--max-tokens", str(max_tokens), "--temperature", "0"]
    out = json.loads(tramontane(*args, "--json").stdout)
    assert out["text"] == decoded(tok, out["tokens"], True)
    plain = tramontane(*args).stdout
    assert plain == out["text"] + "\n"
