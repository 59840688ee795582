"""Adapter files against the reference: PEFT's own adapters give transformers+PEFT's logits here, ours load in
PEFT with the same logits, mistral-finetune's format round-trips, and bad folders fail naming the file."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tramontane import load_model
from tramontane.errors import CheckpointError
from tramontane.lora import LoraConfig, LoraLinear, apply_lora
from tramontane.lora.adapters import load_adapter, save_adapter

peft = pytest.importorskip("peft")

TOKENS = torch.tensor([[3, 17, 42, 99, 5, 8, 64, 21, 1, 2, 7, 100]])
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def randomize(model: torch.nn.Module, seed: int = 1, prefix: str = "lora_") -> None:
    """Random A and B (fresh adapters leave the output unchanged, which would hide every bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if prefix in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def peft_adapter(reference: torch.nn.Module, folder: Path, name: str, **config: object) -> torch.nn.Module:
    """An adapter made by PEFT on a copy of the transformers model, saved to `folder`; the PEFT model."""
    moe = name == "mixtral"
    settings: dict = dict(r=4, lora_alpha=8, target_modules=[t for t in HF_TARGETS if not moe or "_proj" in t
                                                             and t.startswith(("q", "k", "v", "o"))])
    if moe:
        settings["target_parameters"] = EXPERT_PARAMS
    settings.update(config)
    model = peft.get_peft_model(copy.deepcopy(reference), peft.LoraConfig(task_type="CAUSAL_LM", **settings))
    randomize(model)
    model.save_pretrained(folder)
    return model.eval()


def hf_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


@pytest.mark.parametrize("config", [{}, {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3}}],
                         ids=["plain", "patterns"])
def test_peft_made_adapter_gives_peft_logits(tiny_hf, tiny_name: str, tmp_path: Path, config: dict) -> None:
    reference, folder = tiny_hf(tiny_name)
    made = peft_adapter(reference, tmp_path / "adapter", tiny_name, **config)
    ours = load_adapter(load_model(folder), tmp_path / "adapter")
    with torch.no_grad():
        got = ours(TOKENS)
    assert not torch.allclose(hf_logits(made), hf_logits(reference), atol=1e-2)  # the adapter does something
    torch.testing.assert_close(got, hf_logits(made), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("targets", [("wq", "wk", "wv", "wo", "w1", "w2", "w3"), ("wk", "w3")], ids=["all", "some"])
def test_our_adapter_loads_in_peft(tiny_hf, tiny_name: str, tmp_path: Path, targets: tuple[str, ...]) -> None:
    reference, folder = tiny_hf(tiny_name)
    config = LoraConfig(rank=4, alpha=16, targets=targets)
    model = apply_lora(load_model(folder), config)
    randomize(model, seed=2)
    save_adapter(model, tmp_path / "ours", config, base_model=str(folder))
    meta = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["task_type"] == "CAUSAL_LM" and meta["r"] == 4
    assert meta["base_model_name_or_path"] == str(folder)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "ours").eval()
    with torch.no_grad():
        ours = model(TOKENS)
    torch.testing.assert_close(hf_logits(loaded), ours, rtol=1e-4, atol=1e-4)
    # and back: our reader gives the same model again
    again = load_adapter(load_model(folder), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(again(TOKENS), ours, rtol=1e-5, atol=1e-5)


def test_peft_keys_are_hf_names(tiny_hf, tmp_path: Path) -> None:
    _, folder = tiny_hf("mistral-window")
    config = LoraConfig(rank=2, alpha=4)
    save_adapter(apply_lora(load_model(folder), config), tmp_path / "a", config)
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert sorted(meta["target_modules"]) == sorted(HF_TARGETS)


def test_mistral_format_round_trip(tiny_hf, tmp_path: Path) -> None:
    _, folder = tiny_hf("mixtral")
    config = LoraConfig(rank=4, alpha=16, targets=("wq", "wo", "w1"))
    model = apply_lora(load_model(folder), config)
    randomize(model, seed=3)
    save_adapter(model, tmp_path / "m", config, fmt="mistral")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["lora.safetensors", "params.json"]
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    assert params["lora"] == {"enable": True, "rank": 4, "dropout": 0.0, "scaling": 4.0}
    assert params["dim"] == model.args.dim and params["moe"]["num_experts"] == 4
    state = load_file(tmp_path / "m" / "lora.safetensors")
    assert "layers.1.feed_forward.experts.3.w1.lora_B.weight" in state
    with torch.no_grad():
        loaded = load_adapter(load_model(folder), tmp_path / "m")(TOKENS)
        torch.testing.assert_close(loaded, model(TOKENS))
    # mistral-inference's merge: W + B @ A * scaling on the native weights (unfused to reach wq and w1)
    merged = load_model(folder)
    from tramontane.fuse import unfuse_projections

    unfuse_projections(merged)
    with torch.no_grad():
        for name, module in merged.named_modules():
            if f"{name}.lora_A.weight" in state:
                module.weight = torch.nn.Parameter(module.weight + state[f"{name}.lora_B.weight"]
                                                   @ state[f"{name}.lora_A.weight"] * 4.0)
        torch.testing.assert_close(merged(TOKENS), loaded, rtol=1e-4, atol=1e-4)


def test_mistral_format_without_params_uses_inference_default(tiny_hf, tmp_path: Path) -> None:
    _, folder = tiny_hf("mistral-nowindow")
    config = LoraConfig(rank=2, alpha=7, targets=("wv",))
    save_adapter(randomize_and_return(apply_lora(load_model(folder), config)), tmp_path / "m", config, fmt="mistral")
    (tmp_path / "m" / "params.json").unlink()
    model = load_adapter(load_model(folder), tmp_path / "m")
    scalings = {m.scaling for m in model.modules() if isinstance(m, LoraLinear)}
    assert scalings == {2.0}  # mistral-inference's load_lora(scaling=2.0)


def randomize_and_return(model: torch.nn.Module) -> torch.nn.Module:
    randomize(model)
    return model


def _peft_folder(tmp_path: Path, tiny_hf) -> tuple[Path, Path]:
    _, folder = tiny_hf("mistral-window")
    config = LoraConfig(rank=2, alpha=4, targets=("wq",))
    return folder, save_adapter(apply_lora(load_model(folder), config), tmp_path / "bad", config)


@pytest.mark.parametrize("damage, file, message", [
    ("empty", "bad", "no adapter here"),
    ("no-weights", "adapter_model.safetensors", "missing"),
    ("dora", "adapter_config.json", "use_dora"),
    ("not-lora", "adapter_config.json", "peft_type"),
    ("bad-json", "adapter_config.json", "invalid JSON"),
    ("bad-r", "adapter_config.json", "r: want an integer"),
    ("embedding", "adapter_model.safetensors", "embed_tokens"),
    ("shape", "adapter_model.safetensors", "q_proj.lora_B has shape"),
    ("half", "adapter_model.safetensors", "lora_A only"),
    ("truncated", "adapter_model.safetensors", "not a readable safetensors"),
])
def test_bad_adapter_folder_names_the_file(tiny_hf, tmp_path: Path, damage: str, file: str, message: str) -> None:
    base, adapter = _peft_folder(tmp_path, tiny_hf)
    config_file, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    meta = json.loads(config_file.read_text())
    state = load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    if damage == "empty":
        config_file.unlink()
        weights.unlink()
    elif damage == "no-weights":
        weights.unlink()
    elif damage in ("dora", "not-lora", "bad-r"):
        meta.update({"dora": {"use_dora": True}, "not-lora": {"peft_type": "IA3"}, "bad-r": {"r": "four"}}[damage])
        config_file.write_text(json.dumps(meta))
    elif damage == "bad-json":
        config_file.write_text("{not json")
    elif damage == "embedding":
        state["base_model.model.model.embed_tokens.lora_A.weight"] = torch.zeros(2, 128)
        state["base_model.model.model.embed_tokens.lora_B.weight"] = torch.zeros(64, 2)
        save_file(state, weights)
    elif damage == "shape":
        state[key] = torch.zeros(63, 2)
        save_file(state, weights)
    elif damage == "half":
        del state[key]
        save_file(state, weights)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=message) as info:
        load_adapter(load_model(base), adapter)
    assert Path(info.value.path).name == file


def test_mistral_file_with_foreign_keys_names_the_file(tiny_hf, tmp_path: Path) -> None:
    _, folder = tiny_hf("mistral-window")
    (tmp_path / "m").mkdir()
    save_file({"layers.0.attention.wq.weight": torch.zeros(64, 64)}, tmp_path / "m" / "lora.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor") as info:
        load_adapter(load_model(folder), tmp_path / "m")
    assert info.value.path.endswith("lora.safetensors")


def test_unknown_format_is_refused(tiny_hf, tmp_path: Path) -> None:
    _, folder = tiny_hf("mistral-window")
    config = LoraConfig(rank=2)
    with pytest.raises(ValueError, match="adapter format"):
        save_adapter(apply_lora(load_model(folder), config), tmp_path / "x", config, fmt="gguf")
