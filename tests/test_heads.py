"""Task heads (heads.py) against transformers' *ForSequenceClassification, *ForTokenClassification and
*ForQuestionAnswering, on random tiny models built here, with and without padding."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from tramontane import ModelArgs, load_model, save_model
from tramontane.heads import TaskModel

from console import tramontane
from tiny import COMMON, TINY

KINDS = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification", "qa": "ForQuestionAnswering"}
FAMILY = {"mistral-window": "Mistral", "mixtral": "Mixtral", "llama-tied": "Llama"}
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
PAD = 0


def hf_head_model(name: str, kind: str, seed: int = 0) -> transformers.PreTrainedModel:
    config_cls, extra = TINY[name]
    config = config_cls(**COMMON, **extra, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
                        pad_token_id=PAD)
    cls = getattr(transformers, FAMILY[name] + KINDS[kind])
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    made: dict = {}

    def get(name: str, kind: str):
        if (name, kind) not in made:
            folder = tmp_path_factory.mktemp(f"{name}-{kind}")
            ref = hf_head_model(name, kind)
            ref.save_pretrained(folder)
            made[name, kind] = ref, folder
        return made[name, kind]

    return get


def batch(padded: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 12 tokens (longer than the window of 8); rows 1 and 2 padded right or left."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, COMMON["vocab_size"], (3, 12), generator=g)
    mask = torch.ones_like(tokens)
    if padded == "right":
        mask[1, 9:] = 0
        mask[2, 5:] = 0
    elif padded == "left":
        mask[1, :3] = 0
        mask[2, :7] = 0
    return tokens.masked_fill(mask == 0, PAD), mask


def reference(ref: transformers.PreTrainedModel, kind: str, tokens: torch.Tensor, mask: torch.Tensor):
    with torch.no_grad():
        out = ref(input_ids=tokens, attention_mask=mask)
    if kind == "qa":
        return out.start_logits, out.end_logits
    return out.logits


@pytest.mark.parametrize("name", sorted(FAMILY))
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("padded", ["none", "right", "left"])
def test_head_logits_match_transformers(saved, name: str, kind: str, padded: str) -> None:
    ref, folder = saved(name, kind)
    model = load_model(folder)
    assert isinstance(model, TaskModel) and model.args.head is not None
    assert model.args.head.kind == kind and model.args.head.id2label == LABELS
    assert model.args.n_params == sum(p.numel() for p in ref.parameters())
    tokens, mask = batch(padded)
    want = reference(ref, kind, tokens, mask)
    with torch.no_grad():
        got = model(tokens, attention_mask=mask if padded != "none" else None)
    real = mask.bool()
    if kind == "sequence":
        assert got.shape == (3, 3)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    elif kind == "token":
        assert got.shape == (3, 12, 3)
        torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)  # padding outputs are 0 here
        assert not got[~real].any()
    else:
        assert isinstance(got, tuple) and got[0].shape == got[1].shape == (3, 12)
        for g, w in zip(got, want):
            torch.testing.assert_close(g[real], w[real], atol=1e-4, rtol=1e-4)


def test_sequence_head_pools_at_last_non_pad_token_without_a_mask(saved) -> None:
    """No attention mask: pads are attended to (as in transformers) but pooling skips them."""
    ref, folder = saved("mistral-window", "sequence")
    model = load_model(folder)
    tokens, _ = batch("right")
    with torch.no_grad():
        want = ref(input_ids=tokens).logits
        got = model(tokens)
        alone = model(tokens[2:, :5])  # row 2 holds 5 tokens, then pads that causal attention never reaches
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[2:], alone, atol=1e-5, rtol=1e-5)


def test_sequence_head_without_pad_token_takes_one_sequence_only(tmp_path) -> None:
    args = ModelArgs(dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                     vocab_size=50, head={"kind": "sequence", "num_labels": 2})
    model = TaskModel(args).eval()
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 2)
    with pytest.raises(ValueError, match="pad_token_id"):
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]))


@pytest.mark.parametrize("name", sorted(FAMILY))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_convert_to_hf_round_trips_the_head(saved, tmp_path, name: str, kind: str) -> None:
    ref, folder = saved(name, kind)
    save_model(load_model(folder), tmp_path, to="hf")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"][0].endswith(KINDS[kind])
    again = transformers.AutoConfig.from_pretrained(tmp_path)
    assert again.pad_token_id == PAD and again.id2label == LABELS
    back = type(ref).from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens, mask = batch("left")
    want, got = reference(ref, kind, tokens, mask), reference(back, kind, tokens, mask)
    for w, g in zip(want if kind == "qa" else [want], got if kind == "qa" else [got]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_native_round_trip_and_int8(saved, tmp_path) -> None:
    ref, folder = saved("mistral-window", "token")
    tokens, mask = batch("right")
    model = load_model(folder)
    save_model(model, tmp_path / "native", to="native")
    native = load_model(tmp_path / "native")
    assert native.args.head == model.args.head
    with torch.no_grad():
        want = model(tokens, attention_mask=mask)
        torch.testing.assert_close(native(tokens, attention_mask=mask), want, atol=1e-6, rtol=1e-6)
        q = load_model(folder, quantize="int8")
        got = q(tokens, attention_mask=mask)
    assert got.shape == want.shape
    # int8 weights move the logits a little, never the picture: most labels stay the same
    real = mask.bool()
    assert (got[real].argmax(-1) == want[real].argmax(-1)).float().mean() > 0.8
    save_model(q, tmp_path / "int8", to="native")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "int8")(tokens, attention_mask=mask), got)


def test_bad_head_config_names_the_field(tmp_path) -> None:
    from tramontane.errors import ConfigError

    config = {"architectures": ["MistralForSequenceClassification"], "hidden_size": 32, "num_hidden_layers": 1,
              "intermediate_size": 64, "num_attention_heads": 4, "vocab_size": 50, "id2label": {"0": "a", "2": "b"}}
    with pytest.raises(ConfigError, match="id2label"):
        ModelArgs.from_hf_config(config)
    config["id2label"] = {"0": "a", "1": "b"}
    config["pad_token_id"] = 50
    with pytest.raises(ConfigError, match="pad_token_id"):
        ModelArgs.from_hf_config(config)


def word_tokenizer(folder) -> None:
    """A tokenizer.json of whole words (ids 1..127, 0 = padding) for the tiny models."""
    import tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = ["[PAD]", "[UNK]", "the", "wind", "is", "cold", "warm", "today", "a", "lovely", "day", "what"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(len(words), COMMON["vocab_size"])])}
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_classify_command_prints_the_reference_labels(saved, kind: str) -> None:
    from tramontane import load_tokenizer

    ref, folder = saved("llama-tied", kind)
    word_tokenizer(folder)
    texts = ["the wind is cold today", "what a lovely warm day"]
    run = tramontane("classify", "--model", str(folder), "--json", *texts)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    tokenizer = load_tokenizer(folder)
    for text, result in zip(texts, results):
        ids = torch.tensor([tokenizer.encode(text, bos=True)])
        with torch.no_grad():
            probs = torch.softmax(ref(input_ids=ids).logits, dim=-1).reshape(-1, 3)
        got = [result] if kind == "sequence" else result["tokens"]
        assert len(got) == probs.shape[0]
        for p, r in zip(probs, got):
            assert r["label"] == LABELS[int(p.argmax())]
            assert r["score"] == pytest.approx(float(p.max()), abs=1e-4)
        if kind == "sequence":
            assert result["scores"] == pytest.approx({LABELS[i]: float(v) for i, v in enumerate(probs[0])}, abs=1e-4)
        else:
            assert [t["token"] for t in got] == text.split()
    plain = tramontane("classify", "--model", str(folder), texts[0])
    assert plain.returncode == 0 and results[0].get("label", results[0].get("text")) in plain.stdout


def test_classify_refuses_a_language_model(tiny_hf) -> None:
    _, folder = tiny_hf("llama-tied")
    word_tokenizer(folder)
    run = tramontane("classify", "--model", str(folder), "hi")
    assert run.returncode == 1 and "not a classification model" in run.stderr


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_answer_is_the_reference_best_span(saved, name: str) -> None:
    """The span `answer` picks equals a brute-force search over transformers' own start/end logits."""
    from tramontane.heads import answer

    ref, folder = saved(name, "qa")
    model = load_model(folder)
    g = torch.Generator().manual_seed(3)
    question, context = torch.randint(1, 128, (5,), generator=g).tolist(), torch.randint(1, 128, (14,), generator=g).tolist()
    with torch.no_grad():
        out = ref(input_ids=torch.tensor([question + context]))
    start = torch.log_softmax(out.start_logits[0, 5:], -1)
    end = torch.log_softmax(out.end_logits[0, 5:], -1)
    for longest in (1, 4, 30):
        spans = [(float(start[s] + end[e]), s, e) for s in range(14) for e in range(s, min(14, s + longest))]
        score, s, e = max(spans)
        got = answer(model, question, context, max_answer_tokens=longest)
        assert (got.start, got.end) == (s, e)
        assert got.score == pytest.approx(float(torch.tensor(score).exp()), rel=1e-4)


def test_answer_command_prints_the_span(saved) -> None:
    from tramontane import load_tokenizer
    from tramontane.heads import answer

    _, folder = saved("llama-tied", "qa")
    word_tokenizer(folder)
    question, context = "where is the wind", "the wind is cold today in the north"
    run = tramontane("answer", "--model", str(folder), question, "--context", context, "--json")
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    tok = load_tokenizer(folder)
    ids = tok.encode(context, bos=False)
    span = answer(load_model(folder), tok.encode(question, bos=True), ids)
    assert got["answer"] == tok.decode(ids[span.start:span.end + 1]).strip() != ""
    assert (got["start_token"], got["end_token"]) == (span.start, span.end)


@pytest.mark.parametrize("kind", ["sequence", "qa"])
def test_generation_refuses_a_task_model(saved, kind: str) -> None:
    from tramontane import generate
    from tramontane.engine.engine import Engine

    _, folder = saved("mistral-window", kind)
    model = load_model(folder)
    with pytest.raises(ValueError, match=f"'{kind}' task head"):
        generate(model, [[1, 2, 3]], max_tokens=2)
    with pytest.raises(ValueError, match=f"'{kind}' task head"):
        Engine(model, None, max_batch=1)
