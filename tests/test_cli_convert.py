"""`tramontane convert` and `tramontane info`, through the CLI's main() (tests/console.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tramontane import load_model

from console import tramontane


def test_convert_round_trip_hf_native_hf(tiny_hf, tmp_path: Path):
    ref, folder = tiny_hf("mixtral")
    r = tramontane("convert", str(folder), str(tmp_path / "native"), "--to", "native", "--quiet")
    assert r.returncode == 0, r.stderr
    r = tramontane("convert", str(tmp_path / "native"), str(tmp_path / "hf"), "--to", "hf", "--quiet")
    assert r.returncode == 0, r.stderr
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        expected = ref(x).logits
        for sub in ("native", "hf"):
            torch.testing.assert_close(load_model(tmp_path / sub)(x), expected, atol=1e-4, rtol=1e-4)
    # transformers itself reads what we wrote
    import transformers

    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_convert_to_bfloat16(tiny_hf, tmp_path: Path):
    _, folder = tiny_hf("llama-tied")
    r = tramontane("convert", str(folder), str(tmp_path / "out"), "--to", "native", "--dtype", "bfloat16", "--quiet")
    assert r.returncode == 0, r.stderr
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "consolidated.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    # and a bf16 source stays bf16 by default
    r = tramontane("convert", str(tmp_path / "out"), str(tmp_path / "again"), "--to", "hf", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "again" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_convert_errors(tiny_hf, tmp_path: Path):
    _, folder = tiny_hf("llama-tied")
    r = tramontane("convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "native")
    assert r.returncode == 1 and "missing: no such file or folder" in r.stderr
    assert "Traceback" not in r.stderr
    r = tramontane("convert", str(folder), str(tmp_path / "out"), "--to", "onnx")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = tramontane("convert", str(folder), str(tmp_path / "out"), "--to", "native", "--dtype", "int3")
    assert r.returncode == 2 and "--dtype: invalid choice: 'int3'" in r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "config.json").write_text("{")
    r = tramontane("convert", str(bad), str(tmp_path / "out2"), "--to", "native")
    assert r.returncode == 1 and "config.json: invalid JSON" in r.stderr
    r = tramontane("--debug", "convert", str(bad), str(tmp_path / "out3"), "--to", "native")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_info_json(tiny_hf):
    _, folder = tiny_hf("mixtral")
    r = tramontane("info", str(folder), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "hf" and info["experts"] == "2 of 4" and info["n_layers"] == 2
    assert info["parameters"] == sum(p.numel() for p in load_model(folder).parameters())
