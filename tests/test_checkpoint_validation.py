"""Damaged checkpoints fail fast, before any memory is reserved, with our own error naming file and field.

Each case is one that hung, allocated gigabytes or raised a bare Python exception before: every test
builds its own small file (tests/damaged.py) and damages it.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tramontane.loading.common as common
from tramontane import CheckpointError, ConfigError, TensorMismatchError, TokenizerError, load_model
from tramontane.cli import main
from tramontane.formats.gguf_file import read_gguf
from tramontane.loading import read_model_args
from tramontane.loading import validate as validate_module
from tramontane.tokenizer import load_tokenizer

from damaged import (
    ARGS,
    MOE_ARGS,
    edit_json,
    gguf_file,
    hf_folder,
    native_folder,
    random_state,
    set_gguf_array_length,
    set_gguf_scalar,
)


def fails_fast(error: type[Exception], match: str, call, *args, seconds: float = 2.0) -> Exception:
    """`call(*args)` raises `error` matching `match` within `seconds` and without growing the peak RSS
    by more than 200 MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(error, match=match) as caught:
        call(*args)
    took = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert took < seconds, f"took {took:.1f}s"
    assert grown < 200, f"peak RSS grew by {grown:.0f} MiB"
    return caught.value


# ---------------------------------------------------------------------------------------------- params.json


@pytest.mark.parametrize("n_layers", [100_000, 10**9])
def test_native_layer_count_against_tensors(tmp_path: Path, n_layers: int) -> None:
    folder = native_folder(tmp_path / "m")
    edit_json(folder / "params.json", n_layers=n_layers)
    e = fails_fast(ConfigError, f"n_layers is {n_layers}, but the weights hold 2 layers", load_model, folder)
    assert e.path == str(folder / "params.json")


@pytest.mark.parametrize(("changes", "match"), [
    ({"n_layers": 1e9}, r"n_layers must be a positive integer, got 1000000000\.0"),
    ({"n_heads": 0}, "n_heads must be a positive integer, got 0"),
    ({"dim": "64"}, "dim must be a positive integer, got '64'"),
    ({"norm_eps": -1.0}, "norm_eps must be a positive number"),
    ({"head_dim": None, "dim": 30}, r"dim \(30\) is not a multiple of n_heads \(4\)"),
    ({"vocab_size": 2**31}, "vocab_size is 2147483648, but the embedding tok_embeddings.weight has 40 rows"),
    ({"moe": {"num_experts": 2**40, "num_experts_per_tok": 2}}, r"the weights hold no experts per layer"),
    ({"moe": {"num_experts": 0, "num_experts_per_tok": 2}}, "moe.num_experts must be a positive integer"),
    ({"tied_embeddings": "yes"}, "tied_embeddings must be true or false"),
])
def test_native_bad_params(tmp_path: Path, changes: dict, match: str) -> None:
    folder = native_folder(tmp_path / "m")
    edit_json(folder / "params.json", **changes)
    e = fails_fast(ConfigError, match, load_model, folder)
    assert e.path == str(folder / "params.json")


@pytest.mark.parametrize("name", ["params.json", "config.json"])
def test_config_that_is_not_utf8(tmp_path: Path, name: str) -> None:
    """Found by atheris: a params.json with one byte changed raised UnicodeDecodeError."""
    folder = (native_folder if name == "params.json" else hf_folder)(tmp_path / "m")
    (folder / name).write_bytes((folder / name).read_bytes().replace(b"}", b"\xcc}"))
    fails_fast(ConfigError, "invalid JSON: not UTF-8", load_model, folder)


@pytest.mark.parametrize(("changes", "error", "match"), [
    ({"n_heads": 8}, TensorMismatchError, r"tensor 'layers\.0\.attention\.w[qo]\.weight' has shape \[32, 32\], expected \[(64, 32|32, 64)\]"),
    ({"hidden_dim": 2**40}, CheckpointError, r"loading needs about \d+\.\d+ GiB .* but only"),
])
def test_native_sizes_that_disagree_with_the_tensors(tmp_path: Path, changes: dict, error: type[Exception],
                                                     match: str) -> None:
    """Sizes other than the counts are caught by the shape of each tensor, or by the memory estimate."""
    folder = native_folder(tmp_path / "m")
    edit_json(folder / "params.json", **changes)
    # loading gets as far as streaming the weights in, which builds the native kernels on first use in
    # a process (minutes): the time limit is not this test's point
    fails_fast(error, match, load_model, folder, seconds=900)


def test_native_expert_count_against_tensors(tmp_path: Path) -> None:
    folder = native_folder(tmp_path / "m", MOE_ARGS)
    edit_json(folder / "params.json", moe={"num_experts": 2**40, "num_experts_per_tok": 2})
    fails_fast(ConfigError, r"moe\.num_experts is 1099511627776, but the weights hold 4 experts", load_model, folder)
    edit_json(folder / "params.json", moe=None)
    fails_fast(ConfigError, r"the weights hold 4 experts per layer, but moe\.num_experts is not set", load_model, folder)


def test_native_pth_that_runs_code_is_one_line_in_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = native_folder(tmp_path / "m")
    (folder / "consolidated.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, folder / "consolidated.00.pth")
    assert main(["info", str(folder)]) == 1
    out, err = capsys.readouterr()
    assert "pwned" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(folder / "consolidated.00.pth") in lines[0] and "it would call posix.system" in lines[0]


def test_cli_prints_unexpected_errors_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    folder = native_folder(tmp_path / "m")

    def broken(path):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr("tramontane.loading.read_model_args", broken)
    assert main(["info", str(folder)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("tramontane: error: ZeroDivisionError: integer division or modulo by zero "
                   "(run with --debug for the traceback)")
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "info", str(folder)])


# ---------------------------------------------------------------------------------------------- config.json


@pytest.mark.parametrize(("changes", "error", "match"), [
    ({"num_hidden_layers": 10**9}, ConfigError, "num_hidden_layers is 1000000000, but the weights hold 2 layers"),
    ({"num_attention_heads": 0}, ConfigError, "num_attention_heads must be a positive integer, got 0"),
    ({"head_dim": None, "hidden_size": 30}, ConfigError, r"hidden_size \(30\) is not a multiple of num_attention_heads"),
    ({"num_local_experts": 0}, ConfigError, "num_local_experts must be a positive integer, got 0"),
    ({"rope_scaling": "linear"}, ConfigError, "rope_scaling must be a JSON object, got 'linear'"),
    ({"num_key_value_heads": 4}, TensorMismatchError, r"k_proj\.weight' has shape \[16, 32\], expected 32 rows"),
])
def test_hf_bad_config(tmp_path: Path, changes: dict, error: type[Exception], match: str) -> None:
    folder = hf_folder(tmp_path / "m")
    edit_json(folder / "config.json", **changes)
    fails_fast(error, match, load_model, folder)


def _sharded(tmp_path: Path) -> Path:
    folder = hf_folder(tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    return folder


@pytest.mark.parametrize("weight_map", [["model.safetensors"], {"model.embed_tokens.weight": 3}, None])
def test_hf_index_weight_map_malformed(tmp_path: Path, weight_map) -> None:
    folder = _sharded(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    fails_fast(CheckpointError, "weight_map must be an object of tensor name -> file name", load_model, folder)


def test_hf_index_file_name_with_a_nul_byte_is_refused(tmp_path: Path) -> None:
    # found by test_fuzz_checkpoints: pathlib raised a bare "embedded null byte" ValueError
    folder = _sharded(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"": "\x00"}}))
    e = fails_fast(CheckpointError, "NUL byte", load_model, folder)
    assert e.path == str(folder / "model.safetensors.index.json")


@pytest.mark.parametrize("escape", ["../../../../etc/passwd", "/etc/passwd", "../outside.safetensors"])
def test_hf_index_outside_the_folder_is_refused_before_opening(tmp_path: Path, escape: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _sharded(tmp_path)
    save_file({"model.embed_tokens.weight": torch.zeros(40, 32)}, str(tmp_path / "outside.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": escape, "model.norm.weight": "model-00001-of-00001.safetensors"}}))
    opened: list[str] = []
    original = common.safe_open

    def recording(path, **kwargs):
        opened.append(path)
        return original(path, **kwargs)

    monkeypatch.setattr(common, "safe_open", recording)
    e = fails_fast(CheckpointError, "outside the checkpoint folder", load_model, folder)
    assert e.path == str(folder / "model.safetensors.index.json")
    assert opened == []


# ---------------------------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("block_count", [100_000, 2**31])
def test_gguf_block_count_against_tensors(tmp_path: Path, block_count: int) -> None:
    path = gguf_file(tmp_path / "m.gguf")
    set_gguf_scalar(path, "llama.block_count", block_count)
    e = fails_fast(ConfigError, f"llama.block_count is {block_count}, but the weights hold 2 layers", load_model, path)
    assert e.path == str(path)


def test_gguf_expert_count_against_tensors(tmp_path: Path) -> None:
    path = gguf_file(tmp_path / "m.gguf", MOE_ARGS)
    set_gguf_scalar(path, "llama.expert_count", 2**31)
    fails_fast(ConfigError, "llama.expert_count is 2147483648, but the weights hold 4 experts", load_model, path)


def test_gguf_zero_heads(tmp_path: Path) -> None:
    path = gguf_file(tmp_path / "m.gguf")
    set_gguf_scalar(path, "llama.attention.head_count", 0)
    fails_fast(ConfigError, "head_count", load_model, path)


def test_gguf_array_longer_than_the_file(tmp_path: Path) -> None:
    path = gguf_file(tmp_path / "m.gguf")
    set_gguf_array_length(path, "tokenizer.ggml.token_type", 2**40)
    match = r"length of metadata array tokenizer\.ggml\.token_type is 1099511627776, but only \d+ bytes are left"
    e = fails_fast(CheckpointError, match, load_model, path)
    assert e.path == str(path)
    fails_fast(TokenizerError, match, load_tokenizer, path)


def test_gguf_flipped_metadata_bits_never_blow_up(tmp_path: Path) -> None:
    """A flipped bit in any numeric metadata value: an error naming the file, or a model of the size
    its tensors say, never a hang or gigabytes."""
    path = gguf_file(tmp_path / "m.gguf")
    clean = path.read_bytes()
    from gguf import GGUFReader

    reader = GGUFReader(path)
    values = [(f.name, f.parts[f.data[0]]) for f in reader.fields.values() if f.name.startswith("llama.")
              and len(f.data) == 1 and f.parts[f.data[0]].dtype.kind in "uif"]
    # (field, where its value lies in the file, its width in bits)
    fields = [(name, part.ctypes.data - reader.data.ctypes.data, 8 * part.dtype.itemsize) for name, part in values]
    del values, reader
    assert len(fields) >= 10
    refused = 0
    for name, offset, bits in fields:
        for bit in (4, 20, bits - 2):
            data = bytearray(clean)
            data[offset + bit // 8] ^= 1 << (bit % 8)
            path.write_bytes(bytes(data))
            start = time.perf_counter()
            try:
                model = load_model(path)
            except CheckpointError as e:
                assert e.path == str(path)
                assert time.perf_counter() - start < 2, name
                refused += 1
                continue
            assert sum(p.numel() for p in model.parameters()) == ARGS.n_params, name  # sized by the tensors
    assert refused == 3 * (len(fields) - 3)  # every count, size and length: only rope base, epsilon, context load


def _tensor_info_offset(path: Path, name: str, part: int) -> int:
    from gguf import GGUFReader

    info = next(t for t in GGUFReader(path).tensors if t.name == name).field
    return info.offset + sum(int(p.nbytes) for p in info.parts[:part])


def test_gguf_overlapping_tensors(tmp_path: Path) -> None:
    """One tensor's type changed from F32 to F64: its data would run into the next tensor's."""
    path = gguf_file(tmp_path / "m.gguf")
    at = _tensor_info_offset(path, "blk.0.attn_q.weight", 4)
    data = bytearray(path.read_bytes())
    data[at:at + 4] = (28).to_bytes(4, "little")  # GGMLQuantizationType.F64
    path.write_bytes(bytes(data))
    e = fails_fast(CheckpointError, r"tensors blk\.0\.attn_q\.weight \(F64, .*\) and blk\.0\.attn_k\.weight .* overlap",
                   load_model, path)
    assert e.path == str(path)


def test_gguf_tensor_past_the_end(tmp_path: Path) -> None:
    path = gguf_file(tmp_path / "m.gguf")
    at = _tensor_info_offset(path, "output_norm.weight", 5)
    data = bytearray(path.read_bytes())
    data[at:at + 8] = (len(data) * 2 // 32 * 32).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    fails_fast(CheckpointError, r"tensor output_norm\.weight's data .* runs past the end of the file", read_gguf, path)


def test_gguf_layout_of_a_good_file(tmp_path: Path) -> None:
    path = gguf_file(tmp_path / "m.gguf")
    regions = sorted(read_gguf(path).tensors, key=lambda t: t.start)
    assert len(regions) == len(random_state())  # one GGUF tensor per internal tensor (dense, untied)
    assert all(a.end <= b.start for a, b in zip(regions, regions[1:]))
    assert regions[-1].end <= path.stat().st_size


# ---------------------------------------------------------------------------------------------- memory


def test_memory_estimate_refuses_what_does_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = native_folder(tmp_path / "m")
    need = validate_module.check_memory(read_model_args(folder), torch.float32, None, "cpu", folder, 1 << 40)
    assert need == ARGS.n_params * 4
    monkeypatch.setattr(validate_module, "available_memory", lambda device: need - 1)
    match = rf"loading needs about 0\.\d+ GiB \({ARGS.n_params:,} weights as float32\) but only"
    fails_fast(CheckpointError, match, load_model, folder)
    assert validate_module.check_memory(read_model_args(folder), torch.bfloat16, None, "cpu", folder, need // 2) == need // 2


# ---------------------------------------------------------------------------------------------- tokenizers


def _hf_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models

    folder.mkdir(parents=True, exist_ok=True)
    Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])).save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("template", [[{"name": "default"}], [{"template": "{{ x }}"}], 3, ["{{ x }}"]])
def test_chat_template_list_without_template(tmp_path: Path, template) -> None:
    folder = _hf_tokenizer(tmp_path / "t")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    e = fails_fast(TokenizerError, "chat_template must be a string or a list of {name, template} objects",
                   load_tokenizer, folder)
    assert e.path == str(folder / "tokenizer_config.json")


@pytest.mark.parametrize("data", [{"config": "x", "vocab": []}, {"config": [], "vocab": {}}])
def test_tekken_with_a_wrong_structure(tmp_path: Path, data: dict) -> None:
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(data))
    fails_fast(TokenizerError, "not a readable Tekken tokenizer", load_tokenizer, tmp_path)


def test_gguf_tokenizer_field_of_the_wrong_type(tmp_path: Path) -> None:
    from damaged import GGUF_TOKENIZER

    path = gguf_file(tmp_path / "m.gguf", tokenizer={**GGUF_TOKENIZER, "tokenizer.ggml.bos_token_id": "one"})
    fails_fast(TokenizerError, "metadata field tokenizer.ggml.bos_token_id should be int, got str", load_tokenizer, path)
    path = gguf_file(tmp_path / "n.gguf", tokenizer={**GGUF_TOKENIZER, "tokenizer.ggml.token_type": [1, 2]})
    fails_fast(TokenizerError, "tokenizer.ggml.token_type has 2 entries for 40 tokens", load_tokenizer, path)
