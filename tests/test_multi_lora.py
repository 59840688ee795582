"""Several LoRA adapters served together: a batch whose rows use different adapters gives each row the logits
of its adapter alone, the engine's mixed-adapter batches answer as each request alone (prefix cache kept per
adapter), and the server picks an adapter by "model" and lists them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from test_engine import Collector, IdTokenizer, prompt, run_all

from tramontane import generate, load_model
from tramontane.engine import Engine, Request
from tramontane.lora import LoraConfig, LoraLinear, apply_lora
from tramontane.lora.adapters import load_adapter, read_adapter, save_adapter
from tramontane.lora.serving import MultiLoraLinear, serve_adapters
from tramontane.server import create_app

CONFIGS = [LoraConfig(rank=4, alpha=8, targets=("wq", "wk", "wv", "w2")), LoraConfig(rank=2, alpha=6, targets=("wo", "w1", "w3", "wv"))]


def make_adapters(folder: Path, tmp_path: Path) -> list[Path]:
    """Two adapters with different targets and ranks, random weights, saved in both formats."""
    out = []
    for i, (config, fmt) in enumerate(zip(CONFIGS, ["peft", "mistral"])):
        model = apply_lora(load_model(folder), config)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoraLinear):
                    m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.3)
                    m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
        out.append(save_adapter(model, tmp_path / f"adapter{i}", config, fmt=fmt))
    return out


@pytest.fixture(params=["mistral-nowindow", "mixtral"])
def served(request, tiny_hf, tmp_path: Path):
    _, folder = tiny_hf(request.param)
    paths = make_adapters(folder, tmp_path)
    model = load_model(folder)
    rows = serve_adapters(model, [read_adapter(p, model.args) for p in paths])
    singles = [load_model(folder)] + [load_adapter(load_model(folder), p) for p in paths]
    return model, rows, singles


def test_rows_with_different_adapters_get_their_own_logits(served) -> None:
    model, rows, singles = served
    assert any(isinstance(m, MultiLoraLinear) for m in model.modules())
    tokens = torch.randint(0, 128, (5, 9), generator=torch.Generator().manual_seed(0))
    picks = [2, 0, 1, 1, 2]
    rows.index = torch.tensor(picks)
    with torch.no_grad():
        got = model(tokens)
        for row, pick in enumerate(picks):
            torch.testing.assert_close(got[row], singles[pick](tokens[row : row + 1])[0], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(singles[1](tokens[:1]), singles[2](tokens[:1]), atol=1e-3)  # they differ


def test_engine_mixed_adapter_batches_answer_as_alone(served) -> None:
    model, rows, singles = served
    sink = Collector()
    engine = Engine(model, IdTokenizer(), max_batch=4, chunk_size=7, adapters=rows)
    shared = prompt(99, 40)  # the same long prompt under each adapter: its cached blocks must not be shared
    reqs = [Request(shared if i < 3 else prompt(i, 5 + 3 * i), max_tokens=6, emit=sink, adapter=i % 3)
            for i in range(9)]
    run_all(engine, reqs, sink)
    for r in reqs:
        alone = generate(singles[r.adapter], [r.prompt], max_tokens=r.max_tokens)[0].tokens
        assert sink.tokens(r.id) == alone, f"request with adapter {r.adapter}"
    assert len({tuple(sink.tokens(r.id)) for r in reqs[:3]}) == 3  # each adapter answers its own way
    # again, one at a time: the blocks the first round cached now match the prompt, but only its own adapter's
    for adapter in (2, 0, 1):
        later = Collector()
        again = Request(shared, max_tokens=6, emit=later, adapter=adapter)
        run_all(engine, [again], later)
        assert later.tokens(again.id) == sink.tokens(reqs[adapter].id)
        assert later.events[again.id][-1].cached_tokens > 0
    with pytest.raises(ValueError, match="adapter: 3"):
        engine.validate(Request([1, 2], max_tokens=2, emit=sink, adapter=3))


class IdText(IdTokenizer):
    """IdTokenizer with what the HTTP edge reads besides decoding."""

    name = "ids"
    vocab_size = 128
    has_fim = False
    has_tool_calls = False
    chat_format = "none"

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{t}>" for t in ids)


def test_server_picks_the_adapter_by_model_name(served) -> None:
    model, rows, singles = served
    engine = Engine(model, IdText(), max_batch=4, adapters=rows)
    app = create_app(engine, IdText(), "tiny", adapters=["first", "second"])
    ids = prompt(7, 11)
    with TestClient(app, base_url="http://localhost") as client:
        listed = client.get("/v1/models").json()["data"]
        assert [m["id"] for m in listed] == ["tiny", "first", "second"]
        assert listed[1]["parent"] == "tiny" and client.get("/v1/models/second").status_code == 200
        assert listed[1]["type"] == "fine-tuned" and listed[1]["root"] == "tiny" and listed[0]["type"] == "base"
        for name, single in zip(["tiny", "first", "second"], singles):
            r = client.post("/v1/completions", json={"model": name, "prompt": ids, "max_tokens": 5, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == name
            want = generate(single, [ids], max_tokens=5)[0].tokens
            assert r.json()["choices"][0]["text"] == " " + "".join(f"<{t}>" for t in want)
        bad = client.post("/v1/completions", json={"model": "third", "prompt": ids, "max_tokens": 2})
        assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"
        assert "'first'" in bad.json()["error"]["message"]


def test_app_refuses_names_that_do_not_fit(served) -> None:
    model, rows, _ = served
    engine = Engine(model, IdText(), max_batch=2, adapters=rows)
    with pytest.raises(ValueError, match="2 adapters"):
        create_app(engine, IdText(), "tiny", adapters=["only-one"])
    with pytest.raises(ValueError, match="differ"):
        create_app(engine, IdText(), "tiny", adapters=["tiny", "other"])


def test_load_engine_serves_adapter_folders(tiny_hf, tmp_path: Path, monkeypatch) -> None:
    """`load_engine(path, lora=[...])`, what `serve --lora NAME=DIR` calls: folder i (PEFT's format, then
    mistral-finetune's) is engine adapter i + 1, and a batch of all three answers as each model alone."""
    from tramontane.loading import options
    from tramontane.server import serve as serve_module

    _, folder = tiny_hf("mistral-nowindow")
    paths = make_adapters(folder, tmp_path)
    monkeypatch.setattr(options, "load_tokenizer", lambda path: IdText())  # the tiny folder has none
    engine, _ = serve_module.load_engine(folder, lora=paths, max_batch=3)
    assert engine.adapters is not None and engine.adapters.count == 2
    sink = Collector()
    ids = prompt(5, 9)
    reqs = [Request(ids, max_tokens=5, emit=sink, adapter=i) for i in range(3)]
    run_all(engine, reqs, sink)
    singles = [load_model(folder)] + [load_adapter(load_model(folder), p) for p in paths]
    answers = [sink.tokens(r.id) for r in reqs]
    assert answers == [generate(single, [ids], max_tokens=5)[0].tokens for single in singles]
    assert len({tuple(a) for a in answers}) == 3  # the adapters do change the answers
