"""Logits equivalence with Hugging Face transformers, and native/HF folders of the same weights."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tramontane import load_model
from tramontane.fuse import fuse_projections, unfused_state_dict
from tramontane.loading import save_model
from tramontane.model import Transformer

SEQ = 24  # longer than the tiny window of 8


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_fp32_logits_match_transformers(tiny_name, tiny_hf):
    ref_model, folder = tiny_hf(tiny_name)
    model = load_model(folder)
    x = tokens()
    ref = ref_model(x).logits
    out = model(x)
    assert out.shape == (2, SEQ, 128)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_bf16_argmax_matches_transformers(tiny_name, tiny_hf):
    """bf16 is judged at argmax level, against how well transformers' own bf16 tracks fp32."""
    ref_model, folder = tiny_hf(tiny_name)
    model = load_model(folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    x = tokens()
    ref = ref_model(x).logits.argmax(-1)
    ref_bf16 = copy.deepcopy(ref_model).to(torch.bfloat16)(x).logits.argmax(-1)
    ours = model(x).argmax(-1)
    ours_vs_fp32 = (ours == ref).float().mean().item()
    theirs_vs_fp32 = (ref_bf16 == ref).float().mean().item()
    assert ours_vs_fp32 >= min(0.9, theirs_vs_fp32 - 0.06), (ours_vs_fp32, theirs_vs_fp32)


@torch.no_grad()
def test_sliding_window_changes_logits_beyond_window(tiny_hf):
    """The window test above is only meaningful if the window changes the answer."""
    _, folder = tiny_hf("mistral-window")
    model = load_model(folder)
    wide = fuse_projections(Transformer(dataclasses.replace(model.args, sliding_window=None)))
    wide.load_state_dict(model.state_dict())
    x = tokens()
    a, b = model(x), wide(x)
    torch.testing.assert_close(a[:, :8], b[:, :8])  # within the window both see everything
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_native_and_hf_folders_give_same_logits(tiny_name, tiny_hf, tmp_path, dtype):
    _, folder = tiny_hf(tiny_name)
    model = load_model(folder)
    save_model(model, tmp_path / "native", to="native", dtype=dtype)
    save_model(model, tmp_path / "hf", to="hf", dtype=dtype)
    assert (tmp_path / "native" / "params.json").is_file()
    from_native = load_model(tmp_path / "native")
    from_hf = load_model(tmp_path / "hf")
    assert from_native.args == model.args == from_hf.args
    x = tokens()
    if dtype is None:
        torch.testing.assert_close(from_native(x), model(x), atol=0, rtol=0)
    torch.testing.assert_close(from_native(x), from_hf(x), atol=0, rtol=0)


def test_hf_permutation_is_undone(tiny_hf):
    """Native wq rows pair up as (0,1),(2,3): rotating by pairs must equal HF's rotate-half on q_proj."""
    from tramontane.formats.layout import permute_hf_to_native, permute_native_to_hf

    ref_model, folder = tiny_hf("mistral-window")
    q_hf = ref_model.model.layers[0].self_attn.q_proj.weight.detach()
    model = load_model(folder)
    wq = unfused_state_dict(model.state_dict(), model)["layers.0.attention.wq.weight"]
    torch.testing.assert_close(wq, permute_hf_to_native(q_hf, 4))
    torch.testing.assert_close(permute_native_to_hf(wq, 4), q_hf)
    assert not torch.equal(wq, q_hf)


def test_tied_model_has_no_output_matrix(tiny_hf):
    _, folder = tiny_hf("llama-tied")
    model = load_model(folder)
    assert model.output is None
    assert "output.weight" not in model.state_dict()


def test_model_on_meta_allocates_nothing():
    from tramontane import preset

    with torch.device("meta"):
        model = Transformer(preset("mixtral-8x7b"))
    assert model.tok_embeddings.weight.is_meta
    assert sum(p.numel() for p in model.parameters()) == preset("mixtral-8x7b").n_params


@pytest.mark.parametrize("T", [65, 130, 300])
def test_causal_attention_in_blocks_equals_sdpa(T):
    import torch.nn.functional as F

    from tramontane.layers import CAUSAL_BLOCK, attend, causal_in_blocks

    assert CAUSAL_BLOCK < T
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, 4, T, 16, generator=g)
    k, v = torch.randn(2, 2, T, 16, generator=g), torch.randn(2, 2, T, 16, generator=g)
    full_k, full_v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    expected = F.scaled_dot_product_attention(q, full_k, full_v, is_causal=True)
    torch.testing.assert_close(causal_in_blocks(q, full_k, full_v), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend(q, k, v, None, True), expected, atol=1e-5, rtol=1e-5)  # grouped heads
