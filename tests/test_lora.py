"""LoRA modules: a fresh adapter changes nothing, merging equals the unmerged model, and splitting fused
projections back keeps the logits, for float and quantized bases."""

from __future__ import annotations

import pytest
import torch

from tramontane import load_model
from tramontane.lora import LoraConfig, LoraLinear, apply_lora, lora_state_dict, merge_lora

TOKENS = torch.tensor([[3, 17, 42, 99, 5, 8, 64, 21, 1, 2, 7, 100]])


def _randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_fresh_adapter_keeps_logits(tiny_hf, tiny_name: str, quantize: str | None) -> None:
    _, folder = tiny_hf(tiny_name)
    model = load_model(folder, quantize=quantize)
    with torch.no_grad():
        before = model(TOKENS)
        apply_lora(model, LoraConfig(rank=4, alpha=8))
        after = model(TOKENS)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    experts = model.args.moe.num_experts if model.args.moe else 1
    per_layer = 4 + 3 * experts  # wq wk wv wo, and w1 w2 w3 of each expert
    assert len(trainable) == 2 * per_layer * model.args.n_layers


def test_merge_equals_adapter(tiny_hf, tiny_name: str) -> None:
    _, folder = tiny_hf(tiny_name)
    model = apply_lora(load_model(folder), LoraConfig(rank=4, alpha=8, targets=("wq", "wv", "w2")))
    _randomize_adapters(model)
    with torch.no_grad():
        adapted = model(TOKENS)
        plain = load_model(folder)(TOKENS)
        merged = merge_lora(model)(TOKENS)
    assert not torch.allclose(adapted, plain, atol=1e-3)  # the adapters do something
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_merge_refuses_quantized_base(tiny_hf) -> None:
    _, folder = tiny_hf("mistral-nowindow")
    model = apply_lora(load_model(folder, quantize="int8"), LoraConfig(rank=2))
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.w[qkvo]: cannot merge"):
        merge_lora(model)


@pytest.mark.parametrize("field, value, message", [("rank", 0, "rank"), ("dropout", 1.0, "dropout"),
                                                   ("targets", ("wq", "gate"), "gate")])
def test_config_errors_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraConfig(**{field: value})


def test_mistral_adapter_round_trip(tiny_hf, tmp_path) -> None:
    from tramontane.lora.adapters import load_adapter, save_adapter

    _, folder = tiny_hf("mistral-window")
    config = LoraConfig(rank=4, alpha=16, targets=("wq", "wo", "w1"))
    model = apply_lora(load_model(folder), config)
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", config)
    loaded = load_adapter(load_model(folder), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), model(TOKENS))
