"""GGUF reading and writing: the real SmolLM2 file against transformers' GGUF loader, bad files, round trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from tramontane.args import ModelArgs, MoeArgs
from tramontane.errors import CheckpointError, ConfigError, TensorMismatchError
from tramontane.formats.gguf_file import GGUFFile, read_gguf
from tramontane.formats.layout import permute_hf_to_native, permute_native_to_hf
from tramontane.loading.common import expected_shapes
from tramontane.loading.gguf import (
    gguf_tensor_info,
    iter_gguf_tensors,
    load_gguf_state_dict,
    read_gguf_args,
    read_gguf_metadata,
)
from tramontane.loading.gguf_write import write_gguf

from console import tramontane

pytestmark = pytest.mark.xdist_group("smollm2_transformers")  # shares test_smollm2.py's reference load

# transformers' parameter names -> ours, for the dense Llama layout.
HF_TO_INTERNAL = {
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
}

TINY = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-6,
                 vocab_size=128, rope_theta=1e6, sliding_window=32, max_seq_len=256)


# ---------------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_gguf_path: Path) -> GGUFFile:
    return read_gguf(smollm2_gguf_path)


@pytest.fixture(scope="module")
def ours(smollm2_reader: GGUFFile) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    args = read_gguf_args(smollm2_reader)
    return args, dict(iter_gguf_tensors(smollm2_reader, args))


@pytest.fixture(scope="module")
def reference(smollm2_transformers) -> tuple[Any, dict[str, torch.Tensor]]:
    """transformers' config and dequantized weights (HF names, q/k in rotate-half layout; the tied head,
    the embedding table again, left out)."""
    state = smollm2_transformers.state_dict()
    return smollm2_transformers.config, {k: v for k, v in state.items() if k != "lm_head.weight"}


def test_smollm2_args_match_transformers(ours, reference) -> None:
    args, _ = ours
    config, _ = reference
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size) == (576, 30, 9, 3, 49152)
    assert args.tied_embeddings and args.moe is None and args.sliding_window is None
    assert args.dim == config.hidden_size
    assert args.n_layers == config.num_hidden_layers
    assert args.n_heads == config.num_attention_heads
    assert args.n_kv_heads == config.num_key_value_heads
    assert args.head_dim == config.head_dim == 64
    assert args.hidden_dim == config.intermediate_size
    assert args.vocab_size == config.vocab_size
    assert args.tied_embeddings == config.tie_word_embeddings
    assert args.max_seq_len == config.max_position_embeddings == 8192
    assert args.rope_theta == config.rope_parameters["rope_theta"] == 100000.0
    assert args.norm_eps == pytest.approx(config.rms_norm_eps, rel=1e-6)
    assert args.norm_eps == 1e-5  # the float32 in the file, read back as the decimal it was written from


def test_smollm2_tensors_match_transformers(ours, reference) -> None:
    args, weights = ours
    _, hf = reference
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in hf.items():
        if name == "model.embed_tokens.weight":
            mapped["tok_embeddings.weight"] = tensor
        elif name == "model.norm.weight":
            mapped["norm.weight"] = tensor
        else:
            _, _, layer, rest = name.split(".", 3)
            module = HF_TO_INTERNAL[rest.removesuffix(".weight")]
            if module == "attention.wq":
                tensor = permute_hf_to_native(tensor, args.n_heads)
            elif module == "attention.wk":
                tensor = permute_hf_to_native(tensor, args.n_kv_heads)
            mapped[f"layers.{layer}.{module}.weight"] = tensor
    assert sorted(mapped) == sorted(weights)
    assert "output.weight" not in weights  # tied
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32
        assert tensor.shape == mapped[name].shape, name
        torch.testing.assert_close(tensor, mapped[name].float(), atol=1e-6, rtol=0, msg=name)


def test_smollm2_qk_are_stored_interleaved(ours, reference) -> None:
    """GGUF q/k rows are already in our interleaved-pairs layout: transformers has to permute them to rotate-half."""
    args, weights = ours
    _, hf = reference
    q_gguf, q_hf = weights["layers.3.attention.wq.weight"], hf["model.layers.3.self_attn.q_proj.weight"]
    k_gguf, k_hf = weights["layers.3.attention.wk.weight"], hf["model.layers.3.self_attn.k_proj.weight"]
    assert not torch.equal(q_gguf, q_hf) and not torch.equal(k_gguf, k_hf)
    assert torch.equal(permute_native_to_hf(q_gguf, args.n_heads), q_hf)
    assert torch.equal(permute_native_to_hf(k_gguf, args.n_kv_heads), k_hf)


def test_permutation_turns_rotate_half_into_interleaved_pairs() -> None:
    """What the q/k permutation means: rotate-half rotary on HF rows == interleaved rotary on permuted rows."""
    torch.manual_seed(0)
    n_heads, head_dim, dim, pos = 3, 8, 5, 7
    w_hf = torch.randn(n_heads * head_dim, dim, dtype=torch.float64)
    x = torch.randn(dim, dtype=torch.float64)
    angles = pos * 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    cos, sin = angles.cos(), angles.sin()

    q = (w_hf @ x).view(n_heads, 2, head_dim // 2)  # rotate-half: pair (j, j + head_dim/2)
    a, b = q[:, 0], q[:, 1]
    hf_rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=1)  # [n_heads, 2, head_dim/2]

    p = (permute_hf_to_native(w_hf, n_heads) @ x).view(n_heads, head_dim // 2, 2)  # pairs (2j, 2j + 1)
    a, b = p[..., 0], p[..., 1]
    native_rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)  # [n_heads, head_dim/2, 2]

    torch.testing.assert_close(native_rotated, hf_rotated.transpose(1, 2))
    assert torch.equal(permute_native_to_hf(permute_hf_to_native(w_hf, n_heads), n_heads), w_hf)


def test_smollm2_tensor_info_and_metadata(smollm2_reader: GGUFFile) -> None:
    info = gguf_tensor_info(smollm2_reader)
    assert len(info) == 272
    assert info["token_embd.weight"] == ("Q8_0", (49152, 576))
    assert info["blk.0.attn_k.weight"] == ("Q4_1", (192, 576))
    assert info["blk.0.ffn_down.weight"] == ("Q4_1", (576, 1536))
    assert info["output_norm.weight"] == ("F32", (576,))
    meta = read_gguf_metadata(smollm2_reader, "tokenizer.ggml.")
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta["tokenizer.ggml.eos_token_id"] == 2


# ---------------------------------------------------------------------------------------------- bad files


def raw_gguf(path: Path, arch: str = "llama", metadata: dict[str, Any] | None = None,
             tensors: dict[str, np.ndarray] | None = None) -> Path:
    """A GGUF file with exactly the given `{arch}.`-relative metadata and GGUF-named tensors."""
    writer = GGUFWriter(path, arch)
    for key, value in (metadata or {}).items():
        key = f"{arch}.{key}"
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for name, value in (tensors or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_metadata(**changes: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "embedding_length": 64, "block_count": 1, "feed_forward_length": 96, "attention.head_count": 4,
        "attention.head_count_kv": 2, "attention.layer_norm_rms_epsilon": 1e-5,
    }
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def tiny_tensors(**changes: np.ndarray | None) -> dict[str, np.ndarray]:
    """A one-layer dense model in GGUF names (torch-order shapes, as GGUFWriter takes them)."""
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (100, 64), "output_norm.weight": (64,),
        "blk.0.attn_norm.weight": (64,), "blk.0.ffn_norm.weight": (64,),
        "blk.0.attn_q.weight": (64, 64), "blk.0.attn_k.weight": (32, 64), "blk.0.attn_v.weight": (32, 64),
        "blk.0.attn_output.weight": (64, 64),
        "blk.0.ffn_gate.weight": (96, 64), "blk.0.ffn_down.weight": (64, 96), "blk.0.ffn_up.weight": (96, 64),
    }
    tensors = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
    tensors.update(changes)  # type: ignore[arg-type]
    return {k: v for k, v in tensors.items() if v is not None}


def test_raw_tiny_file_loads(tmp_path: Path) -> None:
    tensors = tiny_tensors()
    path = raw_gguf(tmp_path / "tiny.gguf", metadata=tiny_metadata(), tensors=tensors)
    args, weights = load_gguf_state_dict(path)
    assert (args.vocab_size, args.head_dim, args.rope_theta, args.tied_embeddings) == (100, 16, 10000.0, True)
    assert torch.equal(weights["layers.0.feed_forward.w2.weight"], torch.from_numpy(tensors["blk.0.ffn_down.weight"]))


def test_mistral_architecture_reads_like_llama(tmp_path: Path) -> None:
    path = raw_gguf(tmp_path / "m.gguf", "mistral", tiny_metadata(**{"attention.sliding_window": 4096}), tiny_tensors())
    args = read_gguf_args(path)
    assert args.sliding_window == 4096 and args.n_kv_heads == 2


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"XXXX" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF file") as e:
        load_gguf_state_dict(path)
    assert e.value.path == str(path)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        read_gguf(tmp_path / "absent.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf(tmp_path / "empty.gguf")


@pytest.mark.parametrize("size", [6, 24, 5000, 1_785_700, 60_000_000])
def test_truncated_smollm2(smollm2_gguf_path: Path, tmp_path: Path, size: int) -> None:
    """Cut inside the header, the metadata, the tensor table and the tensor data."""
    path = tmp_path / "cut.gguf"
    with smollm2_gguf_path.open("rb") as f:
        path.write_bytes(f.read(size))
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_gguf_state_dict(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_unknown_architecture(tmp_path: Path, arch: str) -> None:
    path = raw_gguf(tmp_path / f"{arch}.gguf", arch, tiny_metadata(), tiny_tensors())
    with pytest.raises(ConfigError, match=f"unsupported architecture '{arch}'") as e:
        read_gguf_args(path)
    assert e.value.path == str(path)


def test_missing_field(tmp_path: Path) -> None:
    path = raw_gguf(tmp_path / "x.gguf", metadata=tiny_metadata(block_count=None), tensors=tiny_tensors())
    with pytest.raises(ConfigError, match="llama.block_count"):
        read_gguf_args(path)


@pytest.mark.parametrize("scaling", [{"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0},
                                     {"rope.scaling.type": "linear", "rope.scaling.factor": 2.0}])
def test_rope_scaling_refused(tmp_path: Path, scaling: dict[str, Any]) -> None:
    path = raw_gguf(tmp_path / "x.gguf", metadata=tiny_metadata(**scaling), tensors=tiny_tensors())
    with pytest.raises(ConfigError, match="rope scaling"):
        read_gguf_args(path)


@pytest.mark.parametrize("scaling", [{"rope.scaling.type": "none"},
                                     {"rope.scaling.type": "linear", "rope.scaling.factor": 1.0}])
def test_rope_scaling_none_and_unit_linear_accepted(tmp_path: Path, scaling: dict[str, Any]) -> None:
    path = raw_gguf(tmp_path / "x.gguf", metadata=tiny_metadata(**scaling), tensors=tiny_tensors())
    assert read_gguf_args(path).dim == 64


def test_rope_freqs_tensor_refused(tmp_path: Path) -> None:
    tensors = tiny_tensors(**{"rope_freqs.weight": np.ones(8, dtype=np.float32)})
    path = raw_gguf(tmp_path / "x.gguf", metadata=tiny_metadata(), tensors=tensors)
    with pytest.raises(ConfigError, match="rope scaling"):
        load_gguf_state_dict(path)


def test_unknown_tensor(tmp_path: Path) -> None:
    tensors = tiny_tensors(**{"blk.0.attn_q.bias": np.zeros(64, dtype=np.float32)})
    path = raw_gguf(tmp_path / "x.gguf", metadata=tiny_metadata(), tensors=tensors)
    with pytest.raises(TensorMismatchError, match=r"unknown tensor blk\.0\.attn_q\.bias") as e:
        load_gguf_state_dict(path)
    assert e.value.path == str(path)


def test_missing_and_misshapen_tensors(tmp_path: Path) -> None:
    path = raw_gguf(tmp_path / "a.gguf", metadata=tiny_metadata(), tensors=tiny_tensors(**{"blk.0.ffn_up.weight": None}))
    with pytest.raises(TensorMismatchError, match="missing tensor.*feed_forward.w3"):
        load_gguf_state_dict(path)
    wrong = np.zeros((48, 64), dtype=np.float32)
    path = raw_gguf(tmp_path / "b.gguf", metadata=tiny_metadata(), tensors=tiny_tensors(**{"blk.0.attn_k.weight": wrong}))
    with pytest.raises(TensorMismatchError, match=r"blk\.0\.attn_k\.weight.*expected shape \(32, 64\)"):
        load_gguf_state_dict(path)


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    ints = np.zeros((100, 64), dtype=np.int32)
    path = raw_gguf(tmp_path / "x.gguf", metadata=tiny_metadata(), tensors=tiny_tensors(**{"token_embd.weight": ints}))
    with pytest.raises(CheckpointError, match=r"token_embd\.weight: unsupported tensor type I32") as e:
        load_gguf_state_dict(path)
    assert e.value.path == str(path)


def test_unknown_tensor_type_id(tmp_path: Path) -> None:
    path = raw_gguf(tmp_path / "x.gguf", metadata=tiny_metadata(), tensors=tiny_tensors())
    info = GGUFReader(path).tensors[0].field
    name_len, _, _, _, raw_type, _ = info.parts
    offset = info.offset + sum(int(part.nbytes) for part in info.parts[:4])
    assert int(raw_type[0]) == GGMLQuantizationType.F32
    data = bytearray(path.read_bytes())
    data[offset:offset + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="unsupported tensor type"):
        read_gguf(path)


def test_unknown_metadata_warns(tmp_path: Path) -> None:
    path = raw_gguf(tmp_path / "x.gguf", metadata=tiny_metadata(logit_scale=2.0), tensors=tiny_tensors())
    with pytest.warns(UserWarning, match="llama.logit_scale"):
        read_gguf_args(path)


# ---------------------------------------------------------------------------------------------- round trips


def random_state(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in expected_shapes(args).items()}


@pytest.mark.parametrize("args", [
    TINY,
    dataclasses.replace(TINY, tied_embeddings=True, sliding_window=None, max_seq_len=None, n_kv_heads=4),
    dataclasses.replace(TINY, moe=MoeArgs(num_experts=3, num_experts_per_tok=2)),
], ids=["dense", "tied", "moe"])
def test_write_read_round_trip_f32_is_exact(tmp_path: Path, args: ModelArgs) -> None:
    state = random_state(args)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, args, state)
    read_args, weights = load_gguf_state_dict(path)
    assert read_args == args
    assert sorted(weights) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(weights[name], tensor), name


def test_moe_layout_in_file(tmp_path: Path) -> None:
    args = dataclasses.replace(TINY, moe=MoeArgs(num_experts=3, num_experts_per_tok=2))
    path = tmp_path / "moe.gguf"
    write_gguf(path, args, random_state(args))
    info = gguf_tensor_info(path)
    assert info["blk.1.ffn_gate_exps.weight"] == ("F32", (3, 96, 64))
    assert info["blk.1.ffn_down_exps.weight"] == ("F32", (3, 64, 96))
    assert info["blk.1.ffn_gate_inp.weight"] == ("F32", (3, 64))
    assert "blk.1.ffn_gate.weight" not in info


def test_old_style_split_experts_are_read(tmp_path: Path) -> None:
    """Files converted before llama.cpp merged experts hold blk.N.ffn_gate.E.weight per expert."""
    rng = np.random.default_rng(1)
    tensors = tiny_tensors(**{"blk.0.ffn_gate.weight": None, "blk.0.ffn_down.weight": None, "blk.0.ffn_up.weight": None})
    tensors["blk.0.ffn_gate_inp.weight"] = rng.standard_normal((2, 64), dtype=np.float32)
    for e in range(2):
        for kind, shape in (("ffn_gate", (96, 64)), ("ffn_down", (64, 96)), ("ffn_up", (96, 64))):
            tensors[f"blk.0.{kind}.{e}.weight"] = rng.standard_normal(shape, dtype=np.float32)
    meta = tiny_metadata(expert_count=2, expert_used_count=2)
    args, weights = load_gguf_state_dict(raw_gguf(tmp_path / "old.gguf", metadata=meta, tensors=tensors))
    assert args.moe == MoeArgs(2, 2)
    expected = torch.from_numpy(tensors["blk.0.ffn_down.1.weight"])
    assert torch.equal(weights["layers.0.feed_forward.experts.1.w2.weight"], expected)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0"])
def test_write_quantized(tmp_path: Path, qtype: str) -> None:
    state = random_state(TINY)
    path = tmp_path / f"{qtype}.gguf"
    write_gguf(path, TINY, state, qtype=qtype)
    info = gguf_tensor_info(path)
    assert info["blk.0.attn_q.weight"][0] == qtype
    assert info["blk.0.attn_norm.weight"][0] == "F32"  # norms stay full precision
    _, weights = load_gguf_state_dict(path)
    kind = GGMLQuantizationType[qtype]
    for name, tensor in state.items():
        if tensor.dim() == 1:
            assert torch.equal(weights[name], tensor), name
        else:
            expected = dequantize(quantize(tensor.numpy(), kind), kind).astype(np.float32)
            assert torch.equal(weights[name], torch.from_numpy(expected)), name


def test_load_in_bfloat16(tmp_path: Path) -> None:
    state = random_state(TINY)
    write_gguf(tmp_path / "x.gguf", TINY, state)
    _, weights = load_gguf_state_dict(tmp_path / "x.gguf", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert torch.equal(weights["output.weight"], state["output.weight"].bfloat16())


def test_tokenizer_metadata_round_trip(tmp_path: Path) -> None:
    tokenizer = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(TINY.vocab_size)],
        "tokenizer.ggml.scores": [float(-i) for i in range(TINY.vocab_size)],
        "tokenizer.ggml.token_type": [1] * TINY.vocab_size,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.add_bos_token": True,
    }
    write_gguf(tmp_path / "x.gguf", TINY, random_state(TINY), tokenizer=tokenizer)
    assert read_gguf_metadata(tmp_path / "x.gguf", "tokenizer.") == tokenizer


def test_write_refuses_mismatched_state(tmp_path: Path) -> None:
    state = random_state(TINY)
    del state["layers.1.attention.wv.weight"]
    with pytest.raises(TensorMismatchError, match="layers.1.attention.wv.weight"):
        write_gguf(tmp_path / "x.gguf", TINY, state)
    with pytest.raises(ValueError, match="qtype"):
        write_gguf(tmp_path / "x.gguf", TINY, random_state(TINY), qtype="Q4_K")


def test_convert_gguf_to_native_folder(smollm2_gguf_path, tmp_path):
    import torch

    from tramontane import load_model

    r = tramontane("convert", str(smollm2_gguf_path), str(tmp_path / "n"), "--to", "native", "--quiet")
    assert r.returncode == 0, r.stderr
    x = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        want = load_model(smollm2_gguf_path, dequantize=True)(x)
        torch.testing.assert_close(load_model(tmp_path / "n")(x), want, atol=0, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize(("qtype", "method"), [("Q4_0", "int4"), ("Q4_1", "int4_asym")])
def test_q4_blocks_load_as_int4_without_requantizing(tmp_path: Path, qtype: str, method: str) -> None:
    from tramontane import load_model
    from tramontane.quantize import Int4Linear, QuantEmbedding

    path = tmp_path / "q4.gguf"
    write_gguf(path, TINY, random_state(TINY), qtype=qtype)
    _, floats = load_gguf_state_dict(path)  # gguf-py's own dequantization of every block
    model = load_model(path, quantize=method)
    emb = model.tok_embeddings
    assert isinstance(emb, QuantEmbedding) and isinstance(model.output, Int4Linear)
    assert model.output.zero_point == (method == "int4_asym")
    # the same values as the file's blocks (a requantization would move some); float16 products
    # rounded alike: exact for Q4_0, within float32 rounding for Q4_1's q * scale + min
    tol = dict(atol=0, rtol=0) if qtype == "Q4_0" else dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(emb.table.dequantize(), floats["tok_embeddings.weight"], **tol)
    torch.testing.assert_close(model.output.dequantize(), floats["output.weight"], **tol)
    w2 = model.layers[1].feed_forward.w2
    assert isinstance(w2, Int4Linear)
    torch.testing.assert_close(w2.dequantize(), floats["layers.1.feed_forward.w2.weight"], **tol)
    qkv = model.layers[0].attention.wqkv.dequantize()
    wq, wk, wv = (floats[f"layers.0.attention.{n}.weight"] for n in ("wq", "wk", "wv"))
    torch.testing.assert_close(qkv, torch.cat([wq, wk, wv]), **tol)


@torch.no_grad()
@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_merged_experts_keep_their_blocks(tmp_path: Path, qtype: str) -> None:
    """A Mixtral GGUF's merged expert tensors stay in their format, one layer per expert."""
    from tramontane import load_model
    from tramontane.gguf_linear import BlockLinear
    from tramontane.quantize import Int4Linear

    # rows of whole 64-element units: what Q8_0 (two blocks a unit) needs to stay as it is
    args = dataclasses.replace(TINY, hidden_dim=128, moe=MoeArgs(num_experts=3, num_experts_per_tok=2))
    path = tmp_path / "moe.gguf"
    write_gguf(path, args, random_state(args), qtype=qtype)
    _, floats = load_gguf_state_dict(path)
    model = load_model(path)
    expert = model.layers[1].feed_forward.experts[2]
    layer = expert.w2
    assert isinstance(layer, Int4Linear if qtype == "Q4_0" else BlockLinear)
    for name in ("w2", "w13"):
        got = getattr(expert, name).dequantize()
        want = floats["layers.1.feed_forward.experts.2.w2.weight"] if name == "w2" else torch.cat(
            [floats[f"layers.1.feed_forward.experts.2.{w}.weight"] for w in ("w1", "w3")])
        assert torch.equal(got, want)
