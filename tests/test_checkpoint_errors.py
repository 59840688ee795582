"""Bad checkpoints get a CheckpointError that names the file and what is wrong."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from tramontane import CheckpointError, ConfigError, ModelArgs, TensorMismatchError, load_model
from tramontane.loading import save_model


@pytest.fixture
def native_folder(tiny_hf, tmp_path):
    _, folder = tiny_hf("mistral-window")
    out = tmp_path / "native"
    save_model(load_model(folder), out, to="native")
    return out


@pytest.fixture
def hf_folder(tiny_hf, tmp_path):
    _, folder = tiny_hf("mistral-window")
    out = tmp_path / "hf"
    shutil.copytree(folder, out)
    return out


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nowhere")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"no params\.json .* or config\.json"):
        load_model(tmp_path)


def test_unknown_architecture(hf_folder):
    cfg = json.loads((hf_folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (hf_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported architecture .*GPT2LMHeadModel"):
        load_model(hf_folder)


def test_invalid_json(native_folder):
    (native_folder / "params.json").write_text("{ not json")
    with pytest.raises(ConfigError, match=r"params\.json: invalid JSON"):
        load_model(native_folder)


def test_missing_field(native_folder):
    params = json.loads((native_folder / "params.json").read_text())
    del params["n_layers"]
    (native_folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match=r"params\.json: missing required field\(s\) n_layers"):
        load_model(native_folder)


def test_bad_value(native_folder):
    params = json.loads((native_folder / "params.json").read_text())
    params["n_kv_heads"] = 3
    (native_folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match="n_heads .* multiple of n_kv_heads"):
        load_model(native_folder)


def test_unknown_field_warns(native_folder):
    params = json.loads((native_folder / "params.json").read_text())
    params["flux_capacitor"] = 1
    (native_folder / "params.json").write_text(json.dumps(params))
    with pytest.warns(UserWarning, match="flux_capacitor"):
        load_model(native_folder)


def test_truncated_safetensors(native_folder):
    f = native_folder / "consolidated.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"consolidated\.safetensors: cannot read safetensors"):
        load_model(native_folder)


def test_garbage_safetensors(hf_folder):
    (hf_folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(hf_folder)


def test_missing_weights_file(hf_folder):
    (hf_folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(hf_folder)


def _edit_native(folder, edit):
    f = folder / "consolidated.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)


def test_missing_tensor(native_folder):
    _edit_native(native_folder, lambda t: t.pop("layers.1.attention.wk.weight"))
    with pytest.raises(TensorMismatchError, match=r"missing tensor\(s\) layers\.1\.attention\.wk\.weight"):
        load_model(native_folder)


def test_extra_tensor(native_folder):
    _edit_native(native_folder, lambda t: t.update({"layers.7.attention.wq.weight": torch.zeros(2, 2)}))
    with pytest.raises(TensorMismatchError, match=r"consolidated\.safetensors: unexpected tensor 'layers\.7"):
        load_model(native_folder)


def test_wrong_shape(native_folder):
    _edit_native(native_folder, lambda t: t.update({"norm.weight": torch.zeros(63)}))
    with pytest.raises(TensorMismatchError, match=r"'norm\.weight' has shape \[63\], expected \[64\]"):
        load_model(native_folder)


def test_unknown_hf_tensor(hf_folder):
    f = hf_folder / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(tensors, f)
    with pytest.raises(TensorMismatchError, match="unexpected tensor 'model.layers.0.self_attn.q_norm.weight'"):
        load_model(hf_folder)


def test_pth_checkpoint_loads_safely(native_folder):
    tensors = load_file(native_folder / "consolidated.safetensors")
    (native_folder / "consolidated.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    torch.save({k: tensors[k] for k in names[:half]}, native_folder / "consolidated.00.pth")
    torch.save({k: tensors[k] for k in names[half:]}, native_folder / "consolidated.01.pth")
    model = load_model(native_folder)
    torch.testing.assert_close(model.norm.weight, tensors["norm.weight"])


def test_pth_with_code_is_refused(native_folder, tmp_path):
    (native_folder / "consolidated.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("executed!",))

    torch.save({"x": Evil()}, native_folder / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: refused .* it would call (builtins\.)?print$"):
        load_model(native_folder)


def test_v01_params_without_rope_theta_means_1e4():
    params = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
              "n_kv_heads": 8, "norm_eps": 1e-05, "sliding_window": 4096, "vocab_size": 32000}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = ModelArgs.from_params(params)
    assert args.rope_theta == 1e4
    assert args.sliding_window == 4096


def test_hf_rope_theta_top_level_or_rope_parameters():
    base = {"architectures": ["MistralForCausalLM"], "hidden_size": 64, "num_hidden_layers": 1,
            "intermediate_size": 96, "num_attention_heads": 4, "vocab_size": 10}
    assert ModelArgs.from_hf_config({**base, "rope_theta": 1e6}).rope_theta == 1e6
    v5 = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    assert ModelArgs.from_hf_config(v5).rope_theta == 5e5
    with pytest.raises(ConfigError, match="rope scaling 'yarn'"):
        ModelArgs.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
