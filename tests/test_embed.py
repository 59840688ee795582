"""Embedding models (bare `MistralModel` folders) and `tramontane.embed`, against transformers on random
tiny models with Mistral's v3 tokenizer: last-token pooling after an appended EOS, mean pooling, batches
of texts of different lengths."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from scripted import V3

from tramontane import embed, load_model, load_tokenizer, save_model
from tramontane.embed import embed_tokens, embedding_tokens
from tramontane.engine import Engine
from tramontane.generate import check_language_model

from tiny import COMMON

VOCAB = 32768  # the v3 tokenizer's
TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog, twice.", "", "Instruct: find it\nQuery: where?",
         "A much longer text, well past the sliding window of eight tokens: one, two, three, four, five."]


def bare_reference(window: int | None, seed: int = 0) -> transformers.MistralModel:
    config = transformers.MistralConfig(**{**COMMON, "vocab_size": VOCAB}, sliding_window=window)
    torch.manual_seed(seed)
    model = transformers.MistralModel._from_config(config, attn_implementation="eager")
    with torch.no_grad():  # spread the weights so that bugs show
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(V3)


@pytest.fixture(scope="module", params=[8, None], ids=["window", "nowindow"])
def bare(request, tmp_path_factory):
    """(transformers' model, its folder) of a bare MistralModel, as embedding models ship."""
    ref = bare_reference(request.param)
    folder = tmp_path_factory.mktemp("bare")
    ref.save_pretrained(folder)
    return ref, folder


def hidden(ref: transformers.PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [T, dim]


def test_a_bare_folder_loads_without_an_output_layer(bare) -> None:
    _, folder = bare
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["MistralModel"]
    model = load_model(folder)
    assert model.args.bare and model.output is None
    assert model.features(torch.tensor([[1, 5, 9]])).shape == (1, 3, COMMON["hidden_size"])


def test_asking_a_bare_model_for_logits_says_it_has_none(bare) -> None:
    model = load_model(bare[1])
    with pytest.raises(ValueError, match="no language-model head.*model.features"):
        model(torch.tensor([[1, 5, 9]]))
    with pytest.raises(ValueError, match="embedding model"):
        check_language_model(model)


def test_last_token_pooling_matches_transformers(bare, tok) -> None:
    ref, folder = bare
    model = load_model(folder)
    got = embed(model, tok, TEXTS, batch_size=2)  # batches of two different lengths: padding inside each
    assert got.shape == (len(TEXTS), COMMON["hidden_size"]) and got.dtype == torch.float32
    for i, text in enumerate(TEXTS):
        ids = [*tok.encode(text, bos=True), tok.eos_id]  # the documented recipe: EOS appended, read there
        want = F.normalize(hidden(ref, ids)[-1], dim=-1)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)


def test_mean_pooling_matches_transformers(bare, tok) -> None:
    ref, folder = bare
    got = embed(load_model(folder), tok, TEXTS, pooling="mean", normalize=False, batch_size=3)
    for i, text in enumerate(TEXTS):
        want = hidden(ref, tok.encode(text, bos=True)).mean(0)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_batches_and_one_at_a_time_agree(bare, tok) -> None:
    model = load_model(bare[1])
    torch.testing.assert_close(embed(model, tok, TEXTS, batch_size=8), embed(model, tok, TEXTS, batch_size=1),
                               atol=1e-5, rtol=0)


def test_one_text_and_no_text(bare, tok) -> None:
    model = load_model(bare[1])
    assert embed(model, tok, "Hello").shape == (1, COMMON["hidden_size"])
    assert embed(model, tok, []).shape == (0, COMMON["hidden_size"])


def test_embedding_tokens_append_eos_for_last_pooling_only(tok) -> None:
    assert embedding_tokens(tok, "Hi") == [*tok.encode("Hi"), tok.eos_id]
    assert embedding_tokens(tok, "Hi", "mean") == tok.encode("Hi")


def test_bad_arguments_name_themselves(bare, tok) -> None:
    model = load_model(bare[1])
    with pytest.raises(ValueError, match="^pooling: must be one of last, mean"):
        embed(model, tok, ["x"], pooling="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^ids\[1\]: no tokens"):
        embed_tokens(model, [[1, 2], []])
    with pytest.raises(ValueError, match=r"^ids\[0\]: token ids must lie in \[0, 32768\)"):
        embed_tokens(model, [[1, VOCAB]])
    with pytest.raises(ValueError, match=r"^texts\[0\]: \d+ tokens exceed the model's context of 512"):
        embed(model, tok, [" a" * 598])


def test_keys_saved_with_the_model_prefix_load_too(bare, tmp_path) -> None:
    """Some embedding checkpoints keep the `model.` prefix of a causal LM's body."""
    _, folder = bare
    tensors = load_file(folder / "model.safetensors")
    save_file({f"model.{k}": v for k, v in tensors.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.testing.assert_close(load_model(tmp_path).tok_embeddings.weight, load_model(folder).tok_embeddings.weight)


def test_a_bare_model_saves_as_transformers_saves_it(bare, tmp_path) -> None:
    ref, folder = bare
    model = load_model(folder)
    save_model(model, tmp_path / "hf", "hf")
    assert sorted(load_file(tmp_path / "hf" / "model.safetensors")) == sorted(load_file(folder / "model.safetensors"))
    again = transformers.AutoModel.from_pretrained(tmp_path / "hf")
    assert type(again) is transformers.MistralModel
    save_model(model, tmp_path / "native", "native")
    assert load_model(tmp_path / "native").args == model.args


def test_an_engine_over_a_bare_model_refuses_generation_and_runs_calls(bare, tok) -> None:
    from tramontane.engine import Request

    model = load_model(bare[1])
    engine = Engine(model, tok)
    with pytest.raises(ValueError, match="^model: this is an embedding model"):
        engine.submit(Request(prompt=[1, 2], max_tokens=4, emit=print))
    engine.start()
    try:
        got = engine.call(lambda m: embed(m, tok, TEXTS)).result(timeout=60)
        with pytest.raises(ZeroDivisionError):
            engine.call(lambda m: 1 // 0).result(timeout=60)
    finally:
        engine.stop()
    torch.testing.assert_close(got, embed(model, tok, TEXTS), atol=0, rtol=0)


def test_a_causal_lm_still_loads_with_its_head_and_embeds(tmp_path, tok) -> None:
    config = transformers.MistralConfig(**{**COMMON, "vocab_size": VOCAB}, sliding_window=None)
    torch.manual_seed(0)
    ref = transformers.MistralForCausalLM._from_config(config, attn_implementation="eager").eval()
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert not model.args.bare and model.output is not None
    ids = [*tok.encode("Hello there", bos=True), tok.eos_id]
    with torch.no_grad():
        out = ref(input_ids=torch.tensor([ids]), output_hidden_states=True)
    torch.testing.assert_close(model(torch.tensor([ids])), out.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(embed(model, tok, ["Hello there"])[0], F.normalize(out.hidden_states[-1][0, -1], dim=-1),
                               atol=1e-5, rtol=0)


def test_the_embed_command_prints_what_embed_gives(bare, tok, monkeypatch, capsys) -> None:
    from tramontane.cli import main
    from tramontane.loading import options

    _, folder = bare
    model = load_model(folder)
    monkeypatch.setattr(options, "load_tokenizer", lambda path: tok)  # the tiny folder has no tokenizer
    texts = ["the tramontane", "a cold wind from the north"]
    assert main(["embed", "--model", str(folder), *texts, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [p["text"] for p in printed] == texts
    torch.testing.assert_close(torch.tensor([p["embedding"] for p in printed]), embed(model, tok, texts))
    assert main(["embed", "--model", str(folder), texts[0], "--pooling", "mean", "--no-normalize"]) == 0
    line = torch.tensor([float(x) for x in capsys.readouterr().out.split()])
    torch.testing.assert_close(line, embed(model, tok, texts[0], pooling="mean", normalize=False)[0], rtol=1e-6, atol=1e-6)


def test_serve_takes_the_embeddings_option() -> None:
    from tramontane.cli import build_parser

    assert build_parser().parse_args(["serve", "--embeddings", "mean"]).embeddings == "mean"
    assert build_parser().parse_args(["serve"]).embeddings is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--embeddings", "max"])
