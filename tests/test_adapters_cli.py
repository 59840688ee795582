"""Adapters at load time: `load_model(lora=)` merges into float weights and keeps LoraLinear on quantized ones
(same logits both ways), `tramontane merge` writes checkpoints transformers loads with PEFT's merged logits, and
`--lora` on the generating commands changes their output to what the adapted model generates."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tramontane import load_model
from tramontane.cli import main
from tramontane.errors import CheckpointError
from tramontane.lora import LoraConfig, LoraLinear, apply_lora
from tramontane.lora.adapters import load_adapter, save_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = torch.tensor([[3, 17, 42, 99, 5, 8, 64, 21, 1, 2, 7, 100]])


def _peft_made(reference: torch.nn.Module, folder: Path, moe: bool) -> torch.nn.Module:
    """A PEFT adapter on every projection PEFT can target, random A and B, saved to `folder`."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] + ([] if moe else ["gate_proj", "up_proj", "down_proj"])
    extra = {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]} if moe else {}
    model = peft.get_peft_model(copy.deepcopy(reference),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM", **extra))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("name", ["mistral-window", "mixtral"])
def test_load_model_lora_merges_floats_and_wraps_quantized(tiny_hf, tmp_path: Path, name: str) -> None:
    reference, folder = tiny_hf(name)
    made = _peft_made(reference, tmp_path / "a", name == "mixtral")
    merged = load_model(folder, lora=tmp_path / "a")
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())  # folded into the weights
    assert all(layer.attention.wqkv is not None for layer in merged.layers)  # fused again, as without an adapter
    with torch.no_grad():
        torch.testing.assert_close(merged(TOKENS), made(TOKENS).logits, rtol=1e-4, atol=1e-4)
        quantized = load_model(folder, quantize="int8", lora=tmp_path / "a")
        plain_int8 = load_model(folder, quantize="int8")
        expected = load_adapter(load_model(folder, quantize="int8"), tmp_path / "a")
        assert any(isinstance(m, LoraLinear) for m in quantized.modules())
        torch.testing.assert_close(quantized(TOKENS), expected(TOKENS))
        assert not torch.allclose(quantized(TOKENS), plain_int8(TOKENS), atol=1e-2)


def test_load_model_lora_errors_name_the_folder(tiny_hf, tmp_path: Path) -> None:
    _, folder = tiny_hf("mistral-window")
    with pytest.raises(CheckpointError, match="no such adapter folder"):
        load_model(folder, lora=tmp_path / "nothing")
    _, other = tiny_hf("mixtral")
    config = LoraConfig(rank=2, targets=("w2",))
    save_adapter(apply_lora(load_model(other), config), tmp_path / "moe", config)
    with pytest.raises(CheckpointError, match="experts") as info:
        load_model(folder, lora=tmp_path / "moe")  # an adapter for another model
    assert info.value.path.endswith("adapter_model.safetensors")


@pytest.mark.parametrize("name", ["mistral-window", "mixtral"])
def test_merge_to_hf_loads_in_transformers(tiny_hf, tmp_path: Path, name: str, capsys) -> None:
    reference, folder = tiny_hf(name)
    made = _peft_made(reference, tmp_path / "a", name == "mixtral")
    assert main(["merge", str(folder), str(tmp_path / "a"), str(tmp_path / "hf"), "--to", "hf", "--quiet"]) == 0
    assert "merged" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        want = made(TOKENS).logits
        torch.testing.assert_close(loaded(TOKENS).logits, want, rtol=1e-4, atol=1e-4)
        assert main(["merge", str(folder), str(tmp_path / "a"), str(tmp_path / "nat"), "--to", "native", "--quiet"]) == 0
        torch.testing.assert_close(load_model(tmp_path / "nat")(TOKENS), want, rtol=1e-4, atol=1e-4)


def test_merge_refuses_a_quantized_base(tiny_hf, tmp_path: Path, capsys) -> None:
    _, folder = tiny_hf("mistral-window")
    assert main(["quantize", str(folder), str(tmp_path / "q"), "--to", "int8", "--quiet"]) == 0
    config = LoraConfig(rank=2, targets=("wq",))
    save_adapter(apply_lora(load_model(folder), config), tmp_path / "a", config)
    assert main(["merge", str(tmp_path / "q"), str(tmp_path / "a"), str(tmp_path / "out"), "--to", "hf"]) == 1
    assert "merging needs float weights" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_lora_changes_the_completion(smollm2_gguf_path: Path, tmp_path: Path, capsys) -> None:
    from tramontane.textgen import complete
    from tramontane.tokenizer import load_tokenizer

    prompt = "The capital of France is"
    tokenizer = load_tokenizer(smollm2_gguf_path)
    model = load_model(smollm2_gguf_path, dequantize=True)
    plain = complete(model, tokenizer, [prompt], max_tokens=8, temperature=0.0)[0].tokens
    config = LoraConfig(rank=2, alpha=4, targets=("wv", "w2"))
    apply_lora(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.5)
    save_adapter(model, tmp_path / "a", config)
    adapted = complete(model, tokenizer, [prompt], max_tokens=8, temperature=0.0)[0].tokens  # LoraLinear, unmerged
    assert adapted != plain  # the adapter matters
    capsys.readouterr()
    assert main(["complete", prompt, "--max-tokens", "8", "--json", "--model", str(smollm2_gguf_path),
                 "--dequantize", "--lora", str(tmp_path / "a")]) == 0  # merged at load
    assert json.loads(capsys.readouterr().out)["tokens"] == list(adapted)


def test_serve_lora_flags_name_the_adapters() -> None:
    from tramontane.cli import build_parser

    a = build_parser().parse_args(["serve", "--lora", "fr=/tmp/x", "--lora", "/data/de-adapter"])
    assert a.lora == [("fr", Path("/tmp/x")), ("de-adapter", Path("/data/de-adapter"))]
    assert build_parser().parse_args(["serve"]).lora == []
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--lora", "name="])
