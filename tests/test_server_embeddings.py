"""POST /v1/embeddings, driven by the official `openai` and `mistralai` clients, over a real engine on a
random tiny embedding model (a bare MistralModel) and a tiny language model, with Mistral's v3 tokenizer:
the vectors are `tramontane.embed`'s."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
import transformers
from live_server import live_server
from mistralai.client import Mistral
from mistralai.client.errors import SDKError
from scripted import V3, scripted_server

from tramontane import embed, load_model, load_tokenizer
from tramontane.embed import embed_tokens
from tramontane.engine import Engine
from tramontane.server import create_app
from tramontane.server.limits import ConnectionLimits, ServerLimits

from tiny import COMMON

MODEL = "tiny-e5"
KEY = "sesame"
TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "Instruct: find it\nQuery: where?"]
DIM = COMMON["hidden_size"]


def save_tiny(folder, cls: type[transformers.PreTrainedModel]) -> None:
    config = transformers.MistralConfig(**{**COMMON, "vocab_size": 32768}, sliding_window=8)
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="eager")
    with torch.no_grad():  # spread the weights so that bugs show
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(V3)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    bare, lm = tmp_path_factory.mktemp("bare"), tmp_path_factory.mktemp("lm")
    save_tiny(bare, transformers.MistralModel)
    save_tiny(lm, transformers.MistralForCausalLM)
    return bare, lm


def serve(folder, tok, **options):
    model = load_model(folder)
    app = create_app(Engine(model, tok, max_batch=2), tok, MODEL, request_timeout=60, **options)
    return model, live_server(app, connections=ConnectionLimits())


@pytest.fixture(scope="module")
def server(folders, tok):
    model, running = serve(folders[0], tok, api_key=KEY)
    with running as url:
        yield url, model


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


def post(url: str, body: dict, key: str | None = KEY, **headers: str) -> httpx.Response:
    if key:
        headers["authorization"] = f"Bearer {key}"
    return httpx.post(f"{url}/v1/embeddings", json=body, headers=headers, timeout=60)


def refusal(res: httpx.Response, status: int = 400) -> dict:
    assert res.status_code == status, res.text
    return res.json()["error"]


# ---------------------------------------------------------------------------------------------- the vectors
def test_openai_floats_are_tramontane_embed(server, client, tok) -> None:
    out = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert out.object == "list" and out.model == MODEL and [d.index for d in out.data] == [0, 1, 2]
    want = embed(server[1], tok, TEXTS)
    torch.testing.assert_close(torch.tensor([d.embedding for d in out.data]), want, atol=1e-6, rtol=0)
    used = sum(len(tok.encode(t)) + 1 for t in TEXTS)  # BOS, the text, EOS
    assert out.usage.prompt_tokens == out.usage.total_tokens == used


def test_base64_is_little_endian_float32(server, client, tok) -> None:
    out = client.embeddings.create(model=MODEL, input=TEXTS[1], encoding_format="base64")
    raw = out.data[0].embedding
    assert isinstance(raw, str)
    got = np.frombuffer(base64.b64decode(raw), dtype="<f4")
    np.testing.assert_allclose(got, embed(server[1], tok, TEXTS[1])[0].numpy(), atol=1e-6)
    # the openai client asks for base64 itself when no format is given, and decodes it
    default = client.embeddings.create(model=MODEL, input=TEXTS[1]).data[0].embedding
    np.testing.assert_allclose(default, got, atol=0)


def test_token_lists_are_run_as_given(server, client) -> None:
    ids = [[1, 520, 1044, 2], [1, 77]]
    out = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    torch.testing.assert_close(torch.tensor([d.embedding for d in out.data]),
                               F.normalize(embed_tokens(server[1], ids, normalize=False), dim=-1), atol=1e-6, rtol=0)
    assert out.usage.prompt_tokens == 6
    one = client.embeddings.create(model=MODEL, input=ids[0], encoding_format="float")  # one token list
    np.testing.assert_allclose(one.data[0].embedding, out.data[0].embedding, atol=0)


def test_dimensions_keep_the_first_components_renormalised(server, client, tok) -> None:
    out = client.embeddings.create(model=MODEL, input=TEXTS, dimensions=16, encoding_format="float")
    want = F.normalize(embed(server[1], tok, TEXTS, normalize=False)[:, :16], dim=-1)
    torch.testing.assert_close(torch.tensor([d.embedding for d in out.data]), want, atol=1e-6, rtol=0)


def test_mistralai_client(server, tok) -> None:
    with Mistral(api_key=KEY, server_url=server[0]) as mistral:
        out = mistral.embeddings.create(model=MODEL, inputs=TEXTS)
        assert out.model == MODEL and out.id
        got = torch.tensor([d.embedding for d in out.data])
        torch.testing.assert_close(got, embed(server[1], tok, TEXTS), atol=1e-6, rtol=0)
        with pytest.raises(SDKError) as e:
            mistral.embeddings.create(model=MODEL, inputs=TEXTS, output_dtype="binary")
    assert e.value.status_code == 400 and json.loads(e.value.body)["error"]["param"] == "output_dtype"


def test_mistrals_field_names_are_taken(server, tok) -> None:
    res = post(server[0], {"model": MODEL, "inputs": ["Hello"], "output_dimension": 8, "output_dtype": "float"})
    assert res.status_code == 200, res.text
    assert len(res.json()["data"][0]["embedding"]) == 8


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "dimensions": DIM + 1}, "dimensions"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "output_dtype": "int8"}, "output_dtype"),
    ({"input": "x", "dimensions": 8, "output_dimension": 16}, "output_dimension"),
    ({"input": "x", "inputs": "y"}, "input"),
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": [[1, 2], []]}, "input[1]"),
    ({"input": [1, 40000]}, "input[0]"),
    ({"input": "x\u0000"}, "input"),
    ({"input": 5}, "input"),
])
def test_bad_fields_are_named(server, body: dict, param: str) -> None:
    assert refusal(post(server[0], {"model": MODEL, **body}))["param"] == param


def test_an_input_beyond_the_context_is_refused(server) -> None:
    error = refusal(post(server[0], {"input": ["fine", " a" * 600]}))
    assert error["code"] == "context_length_exceeded" and error["message"].startswith("input[1]:")


def test_another_model_is_not_found(server) -> None:
    assert refusal(post(server[0], {"model": "gpt-4", "input": "x"}), 404)["code"] == "model_not_found"


def test_an_embedding_model_does_not_chat(server) -> None:
    res = httpx.post(f"{server[0]}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                     headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    assert "embedding model" in refusal(res)["message"]
    (card,) = httpx.get(f"{server[0]}/v1/models", headers={"authorization": f"Bearer {KEY}"}).json()["data"]
    assert not any(card["capabilities"][c] for c in ("completion_chat", "completion_fim", "function_calling"))


def test_the_key_guards_the_path_and_metrics_count_it(server) -> None:
    assert post(server[0], {"input": "x"}, key=None).status_code == 401
    before = httpx.get(f"{server[0]}/metrics").text
    assert post(server[0], {"input": ["a", "b"]}).status_code == 200
    after = httpx.get(f"{server[0]}/metrics").text

    def count(text: str) -> float:
        return next(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("tramontane_embedding_inputs_total"))

    assert count(after) - count(before) == 2


def test_the_body_limit_the_prompt_cap_and_the_host_check_guard_the_path(folders, tok) -> None:
    _, running = serve(folders[0], tok, limits=ServerLimits(max_request_bytes=2000, max_prompt_chars=100))
    with running as url:
        assert post(url, {"input": "x"}, key=None).status_code == 200
        assert post(url, {"input": "x"}, key=None, host="evil.example").status_code == 403
        assert post(url, {"input": "x" * 3000}, key=None).status_code == 413
        assert refusal(post(url, {"input": ["x", "y" * 150]}, key=None))["param"] == "input[1]"


# ---------------------------------------------------------------------------------------------- language models
def test_a_language_model_has_no_embeddings_by_default() -> None:
    with scripted_server(MODEL) as (url, _), openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as c:
        with pytest.raises(openai.BadRequestError) as e:
            c.embeddings.create(model=MODEL, input="x")
    assert "embeddings='last'" in str(e.value) and "--embeddings" in str(e.value)


def test_a_language_model_pools_its_hidden_states_when_asked(folders, tok) -> None:
    model, running = serve(folders[1], tok, embeddings="mean")
    with running as url, openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as c:
        out = c.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
        chat = c.completions.create(model=MODEL, prompt="Hi", max_tokens=2)  # and it still generates
    torch.testing.assert_close(torch.tensor([d.embedding for d in out.data]), embed(model, tok, TEXTS, pooling="mean"),
                               atol=1e-6, rtol=0)
    assert chat.choices[0].finish_reason == "length"


def test_the_pooling_option_is_checked(folders, tok) -> None:
    model = load_model(folders[1])
    with pytest.raises(ValueError, match="^embeddings: must be one of last, mean"):
        create_app(Engine(model, tok, max_batch=1), tok, MODEL, embeddings="max")
