"""The attention-mask visualizer draws the mask the attention really receives (captured from layers.attend)."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

import tramontane.layers as layers
from tramontane import KVCache, ModelArgs, Transformer, load_tokenizer, visualize_mask
from tramontane.mask_viz import attention_grid, parse_grid

from console import tramontane

TEXT = "Do you have mayonnaise recipes?"
ARGS = ModelArgs(dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                 vocab_size=64, sliding_window=4096)


def used_mask(monkeypatch: pytest.MonkeyPatch, window: int | None, T: int, cached: bool) -> torch.Tensor:
    """[T, T] mask that the attention of a real forward over T tokens is given (SDPA's causal one when
    it is given none but is_causal)."""
    seen: list[tuple[torch.Tensor | None, bool]] = []
    real = layers.attend

    def spy(q, k, v, mask, is_causal):
        seen.append((mask, is_causal))
        return real(q, k, v, mask, is_causal)

    monkeypatch.setattr(layers, "attend", spy)
    # (the model's own forward runs the Python blocks, which hand attention a mask; generation would run a
    # short prompt as rows of the native stack, whose kernel applies the same rule without a mask tensor)
    args = dataclasses.replace(ARGS, sliding_window=window)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    tokens = torch.randint(0, args.vocab_size, (1, T))
    with torch.no_grad():
        if cached:  # the generation path: a prompt prefilled into an empty cache row
            cache = KVCache.create(args, batch_size=1, capacity=64)
            model(tokens, torch.arange(T)[None], cache=cache)
        else:
            model(tokens)
    mask, is_causal = seen[0]
    if mask is None:
        assert is_causal
        q = torch.zeros(1, 1, T, 1)
        # SDPA's own causal rule, read back through SDPA: row t of an identity value matrix averages keys 0..t
        eye = torch.eye(T)[None, None]
        weights = torch.nn.functional.scaled_dot_product_attention(q, q, eye, is_causal=True)[0, 0]
        return weights > 0
    return mask[0, 0]


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf_path):
    return load_tokenizer(smollm2_gguf_path)


@pytest.mark.parametrize("window", [1, 3, 5, 100, None])  # shorter and longer than the 8 tokens
@pytest.mark.parametrize("cached", [False, True])
def test_grid_cells_equal_the_mask_attention_uses(monkeypatch, tokenizer, window, cached) -> None:
    text = visualize_mask(dataclasses.replace(ARGS, sliding_window=window), TEXT, tokenizer=tokenizer)
    grid = parse_grid(text.split("\n", 2)[2])
    T = len(tokenizer.encode(TEXT, bos=True))
    assert grid.shape == (T, T) and T == 8
    assert torch.equal(grid, used_mask(monkeypatch, window, T, cached))
    assert torch.equal(grid, attention_grid(T, window))


def test_window_override_and_model_window(tokenizer) -> None:
    args = dataclasses.replace(ARGS, sliding_window=2)
    own = parse_grid(visualize_mask(args, TEXT, tokenizer=tokenizer).split("\n", 2)[2])
    assert own.sum(1).tolist() == [1] + [2] * 7  # each token: itself and the one before
    wide = parse_grid(visualize_mask(args, TEXT, tokenizer=tokenizer, window=50).split("\n", 2)[2])
    assert wide.sum(1).tolist() == list(range(1, 9))


def test_several_prompts_get_one_grid_each(tokenizer) -> None:
    text = visualize_mask(dataclasses.replace(ARGS, sliding_window=None), [TEXT, "Hi there"], tokenizer=tokenizer)
    blocks = text.split("\n\n")
    assert len(blocks) == 2 and blocks[1].startswith("prompt 1 (batch row 1)")
    assert parse_grid(blocks[1].split("\n", 2)[2]).shape == (2, 2)


def test_mask_command_grid_and_png(smollm2_gguf_path, tmp_path) -> None:
    png = tmp_path / "mask.png"
    run = tramontane("mask", "--model", str(smollm2_gguf_path), "--window", "3", "--png", str(png), TEXT)
    assert run.returncode == 0, run.stderr
    grid_text = run.stdout.split("\n", 2)[2].rsplit("\nwrote", 1)[0]
    assert torch.equal(parse_grid(grid_text), attention_grid(8, 3))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tramontane("mask", "--window", "0", TEXT)
    assert bad.returncode == 2 and "--window: must be >= 1" in bad.stderr


def test_png_without_matplotlib_says_how_to_install(monkeypatch, tokenizer, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match=r"tramontane\[viz\]"):
        visualize_mask(ARGS, TEXT, tokenizer=tokenizer, png=tmp_path / "m.png")
