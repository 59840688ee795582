"""GGUF block formats kept as stored (kernels/blocks.cpp, blocks.py): dequantization equals gguf-py's reference
bit for bit, and products equal a plain PyTorch reference, on every instruction set this CPU has."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from test_quantize import quantize_activations

from tramontane import generate, load_model
from tramontane.args import ModelArgs
from tramontane.gguf_linear import (
    BLOCK_FORMATS,
    INTERLEAVED_FORMATS,
    BlockLinear,
    block_formats,
    r8_order,
    row_bytes,
)
from tramontane.kernels import load_kernels
from tramontane.kernels.policy import kernel_policy
from tramontane.loading import save_model
from tramontane.loading.gguf_write import write_gguf_blocks

from test_native_decode import paired_steps

# where each format keeps its float16 fields inside one ggml block: (offsets)
HALF_FIELDS = {"Q8_0": (0,), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0, scale: float = 0.02) -> torch.Tensor:
    """Random rows of a block format: random bytes, with finite float16 scales up to `scale`."""
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    for at in HALF_FIELDS[kind]:
        halves = rng.uniform(-scale, scale, size=(rows, cols // block)).astype(np.float16)
        data[..., at : at + 2] = halves.view(np.uint8).reshape(rows, cols // block, 2)
    return torch.from_numpy(data.reshape(rows, -1))


def reference(kind: str, w: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(gguf_dequantize(w.numpy(), GGMLQuantizationType[kind]).astype(np.float32))


def isas() -> list[str]:
    ext = load_kernels()
    if ext is None:
        return []
    # an AMX CPU runs the AVX-512 kernels below block_amx_min_rows rows, which must be tested there too
    return list(ext.isas())


@pytest.fixture(params=isas())
def isa(request):
    """Each instruction set this CPU has (the portable path on every CPU)."""
    ext = load_kernels()
    best = ext.isa()
    ext.set_isa(request.param)
    yield request.param
    ext.set_isa(best)


@pytest.mark.parametrize("kind", sorted(BLOCK_FORMATS))
def test_dequantize_equals_gguf_reference_bit_for_bit(kind, isa):
    w = random_blocks(kind, 24, 512)
    ours = load_kernels().block_dequantize(w, BLOCK_FORMATS[kind])
    assert torch.equal(ours, reference(kind, w))
    # bf16 (what prefill tiles multiply where the policy's GEMM is bf16): rounded as Tensor.to rounds
    bf16 = load_kernels().block_dequantize(w, BLOCK_FORMATS[kind], bf16=True)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16.view(torch.int16), ours.bfloat16().view(torch.int16))


def kernel_product(kind: str, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """block_linear's product, checked against the dequantized weights times x as the kernels round them:
    x in the activation parts in use (test_quantize.quantize_activations), or on AMX tiles (from
    block_amx_min_rows rows) x and the weights to bf16."""
    ext = load_kernels()
    if ext.isa() == "amx" and x.shape[0] >= ext.block_amx_min_rows(BLOCK_FORMATS[kind]):
        want = x.bfloat16().double() @ reference(kind, w).bfloat16().double().T
    else:
        want = quantize_activations(x, ext.activation_parts()).double() @ reference(kind, w).double().T
    got = ext.block_linear(x, w, BLOCK_FORMATS[kind])
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    return got


@pytest.mark.parametrize("kind", sorted(BLOCK_FORMATS))
@pytest.mark.parametrize("rows", [1, 3, 5, 16])
def test_products_equal_dequantize_then_matmul(kind, rows, isa):
    K = 768 if BLOCK_FORMATS_UNIT[kind] == 256 else 576  # 576 is SmolLM2's width: whole 64s, not 256s
    w = random_blocks(kind, 37, K, seed=rows)
    if BLOCK_FORMATS_UNIT[kind] == 64:  # the kernels step 256 elements: rows ending 64, 128 or 192 into a step
        for width in (64, 640, 704):
            xs = torch.randn(rows, width, generator=torch.Generator().manual_seed(width))
            kernel_product(kind, random_blocks(kind, 5, width, seed=width), xs)
    layer = BlockLinear.from_blocks(w, K, kind)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    got = kernel_product(kind, w, x)
    # the layer itself: the kernel for decode-sized inputs, dequantize + matmul beyond
    torch.testing.assert_close(layer(x), got)
    big = torch.randn(40, K)
    want = big @ reference(kind, w).T
    tol = 1e-4 if kernel_policy().gemm_dtype == torch.float32 else 1e-2  # bf16 operands where the CPU has AMX
    torch.testing.assert_close(layer(big), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("kind", sorted(BLOCK_FORMATS))
@pytest.mark.parametrize("rows", [1, 5])
def test_products_with_one_activation_part(kind, rows, isa):
    ext = load_kernels()
    K = 768 if BLOCK_FORMATS_UNIT[kind] == 256 else 576
    w, x = random_blocks(kind, 37, K, seed=rows), torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    two = ext.block_linear(x, w, BLOCK_FORMATS[kind])
    before = ext.activation_parts()
    ext.set_activation_parts(1)
    try:
        one = kernel_product(kind, w, x)
    finally:
        ext.set_activation_parts(before)
    if not (ext.isa() == "amx" and rows >= ext.block_amx_min_rows(BLOCK_FORMATS[kind])):
        assert not torch.allclose(one, two, rtol=1e-5, atol=1e-5), "expected the one-part product"


def interleaved(kind: str, w: torch.Tensor) -> torch.Tensor:
    """Rows of Q5_0, Q5_1 or Q8_0 blocks interleaved by eights, as BlockLinear.interleave repacks them."""
    return w.view(w.shape[0] // 8, -1)[:, r8_order(kind, w.shape[1] // row_bytes(kind, 32) * 32)].reshape(w.shape)


@pytest.mark.parametrize("kind", INTERLEAVED_FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 5, 16])
@pytest.mark.parametrize("parts", [1, 2])
def test_interleaved_products_equal_dequantize_then_matmul(kind, rows, parts, isa):
    """Q5 and Q8_0 rows interleaved by eights run the interleaved int4 kernels (kernels/int4.cpp; Q5 with fifth bits):
    on every instruction set (AMX's too: the policy interleaves none there, but the kernel must still be
    right), both activation precisions, widths of one block pair and SmolLM2's 576."""
    ext = load_kernels()
    before = ext.activation_parts()
    ext.set_activation_parts(parts)
    try:
        for K in (64, 576):
            w = random_blocks(kind, 40, K, seed=rows + K)
            x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
            want = quantize_activations(x, parts).double() @ reference(kind, w).double().T
            got = ext.block_linear(x, interleaved(kind, w), BLOCK_FORMATS[kind], interleaved=True)
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
            # the prefill tiles' floats: each row put back in order, then as gguf-py dequantizes it
            back = ext.block_dequantize(interleaved(kind, w), BLOCK_FORMATS[kind], interleaved=True)
            assert torch.equal(back, reference(kind, w))
    finally:
        ext.set_activation_parts(before)


def test_interleaving_is_for_some_formats_and_rows_in_eights():
    ext = load_kernels()
    with pytest.raises(RuntimeError, match="Q5_0, Q5_1 or Q8_0 only"):
        ext.block_linear(torch.randn(1, 256), random_blocks("Q4_K", 8, 256), BLOCK_FORMATS["Q4_K"], interleaved=True)
    with pytest.raises(RuntimeError, match="rows come in eights"):
        ext.block_linear(torch.randn(1, 64), random_blocks("Q5_0", 12, 64), BLOCK_FORMATS["Q5_0"], interleaved=True)
    with pytest.raises(ValueError, match="Q6_K: rows of this format are not interleaved"):
        BlockLinear.from_blocks(random_blocks("Q6_K", 8, 256), 256, "Q6_K").interleave()
    with pytest.raises(ValueError, match="Q5_1: 12 output rows cannot be interleaved"):
        BlockLinear.from_blocks(random_blocks("Q5_1", 12, 64), 64, "Q5_1").interleave()
    assert not BlockLinear.from_blocks(random_blocks("Q6_K", 8, 256), 256, "Q6_K").interleaves()


@pytest.mark.parametrize("kind", INTERLEAVED_FORMATS)
def test_interleaved_layer_keeps_its_outputs_rows_and_state_dict(kind, isa, monkeypatch):
    w = random_blocks(kind, 48, 576)
    layer = BlockLinear.from_blocks(w.clone(), 576, kind)
    x, big = torch.randn(3, 576), torch.randn(80, 576)
    before = layer(x), layer(big), layer.dequantize(), {k: v.clone() for k, v in layer.state_dict().items()}
    layer.interleave()
    assert layer.interleaved and "interleaved=True" in repr(layer) and not torch.equal(layer.weight, w)
    torch.testing.assert_close(layer(x), before[0], rtol=1e-4, atol=1e-4 * before[0].abs().max().item())  # interleaved kernel
    if isa != "amx":  # (on AMX the rows in order take the tiles at any row count, interleaved ones never)
        assert torch.equal(layer(big), before[1])  # dequantize + GEMM: rows put back in order first
    assert torch.equal(layer.dequantize(), before[2])
    for rows in (slice(8, 24), slice(3, 20), torch.tensor([47, 0, 9, 9])):  # whole groups, or some rows of them
        assert torch.equal(layer.dequantize(rows), reference(kind, w)[rows])
    with monkeypatch.context() as m:  # without the kernels: the rows put back in order by gguf_linear.r8_order
        m.setattr("tramontane.gguf_linear.load_kernels", lambda: None)
        assert torch.equal(layer.dequantize(torch.tensor([47, 0, 9])), reference(kind, w)[[47, 0, 9]])
    assert layer.state_dict().keys() == before[3].keys() and torch.equal(layer.state_dict()["weight"], w)
    other = BlockLinear.from_blocks(torch.zeros_like(w), 576, kind)
    other.interleave()
    other.load_state_dict(before[3])  # rows in order in, interleaved kept
    assert other.interleaved and torch.equal(other.weight, layer.weight)
    layer.in_order()
    assert not layer.interleaved and torch.equal(layer.weight, w)


@pytest.mark.skipif(load_kernels() is None or load_kernels().isa() != "amx", reason="this CPU has no AMX")
@pytest.mark.parametrize("kind", sorted(BLOCK_FORMATS))
@pytest.mark.parametrize("rows", [6, 9, 17, 33, 70])
def test_amx_products_of_every_row_count(kind, rows):
    # 6 and 9: the first row counts on tiles (K-quants, blocks of 32); 17 and 33: a second x chunk, a second
    # pair of chunks (a unit's blocks decoded once and reused); 70 weight rows: two 32-row units and a part
    K = 768 if BLOCK_FORMATS_UNIT[kind] == 256 else 576
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    kernel_product(kind, random_blocks(kind, 70, K, seed=rows), x)
    assert load_kernels().block_amx_min_rows(BLOCK_FORMATS[kind]) in (6, 9)


BLOCK_FORMATS_UNIT = {"Q8_0": 64, "Q5_0": 64, "Q5_1": 64, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}


def test_units_match_the_kernels():
    ext = load_kernels()
    for kind, number in BLOCK_FORMATS.items():
        elements, nbytes = ext.block_unit(number)
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
        assert elements == BLOCK_FORMATS_UNIT[kind] and nbytes == size * elements // block


def test_layer_without_kernels_dequantizes_with_the_reference(monkeypatch):
    w = random_blocks("Q4_K", 8, 512)
    layer = BlockLinear.from_blocks(w, 512, "Q4_K")
    monkeypatch.setattr("tramontane.gguf_linear.load_kernels", lambda: None)
    assert torch.equal(layer.dequantize(), reference("Q4_K", w))
    assert torch.equal(layer.dequantize(torch.tensor([5, 1])), reference("Q4_K", w)[[5, 1]])


# ---------------------------------------------------------------------------------------------- a mixed file
# Like a Q4_K_M file: every format in one model, layer 0's q/k/v alike (fused), layer 1's not.
MIXED = ModelArgs(dim=256, n_layers=2, head_dim=32, hidden_dim=512, n_heads=8, n_kv_heads=4, norm_eps=1e-5,
                  vocab_size=320, rope_theta=1e4, max_seq_len=512, tied_embeddings=False)
LAYOUT = {"tok_embeddings": "Q8_0", "output": "Q5_1", "attention.wo": "Q5_0", "feed_forward.w1": "Q5_K",
          "feed_forward.w3": "Q5_K", "feed_forward.w2": "Q6_K", "attention.wq": "Q4_K", "attention.wk": "Q4_K",
          "attention.wv": "Q4_K", "layers.1.attention.wv": "Q6_K", "layers.1.attention.wk": "Q8_0"}


def mixed_kind(name: str) -> str | None:
    stem = name.removesuffix(".weight")
    if stem in LAYOUT:
        return LAYOUT[stem]
    return LAYOUT.get(stem.split(".", 2)[-1]) if stem.startswith("layers.") else None


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mixed") / "mixed.gguf"
    rng = np.random.default_rng(0)

    def blocks(name: str, shape: tuple[int, ...]):
        kind = mixed_kind(name)
        if kind is None:  # norms
            return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32), None
        rows = random_blocks(kind, shape[0], shape[1], seed=len(name), scale=0.002).numpy()
        return rows, GGMLQuantizationType[kind]

    write_gguf_blocks(path, MIXED, blocks)
    return path


@torch.no_grad()
def test_mixed_file_keeps_every_tensor_in_its_format(mixed_file, monkeypatch):
    import tramontane.fuse as fuse

    def no_copy(*args, **kwargs):
        raise AssertionError("fusing copied a projection: the loader did not read its parts into one buffer")

    monkeypatch.setattr(fuse, "weight_empty", no_copy)
    model = load_model(mixed_file)
    assert block_formats(model) == Counter({"Q4_K": 1 + 1, "Q6_K": 2 + 1, "Q5_K": 2, "Q5_0": 2, "Q8_0": 2,
                                            "Q5_1": 1})
    first, second = model.layers[0].attention, model.layers[1].attention
    assert isinstance(first.wqkv, BlockLinear) and first.wqkv.kind == "Q4_K"  # alike: fused
    assert second.wqkv is None and (second.wq.kind, second.wk.kind, second.wv.kind) == ("Q4_K", "Q8_0", "Q6_K")
    reader = GGUFReader(mixed_file)
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    assert torch.equal(model.output.weight, torch.from_numpy(stored["output.weight"]))  # the file's bytes
    assert torch.equal(model.layers[1].attention.wv.weight, torch.from_numpy(stored["blk.1.attn_v.weight"]))
    # fused projections are the file's bytes, read into one buffer (fusing copied nothing: see no_copy)
    for fused, parts in ((first.wqkv, ("attn_q", "attn_k", "attn_v")), (model.layers[1].feed_forward.w13,
                                                                           ("ffn_gate", "ffn_up"))):
        assert isinstance(fused, BlockLinear)
        want = torch.cat([torch.from_numpy(stored[f"blk.{0 if fused is first.wqkv else 1}.{p}.weight"]) for p in parts])
        assert torch.equal(fused.weight, want)
    table = model.tok_embeddings.table
    assert isinstance(table, BlockLinear) and table.kind == "Q8_0"
    # about the file's size in memory, not float32's
    held = sum(t.nbytes for t in model.state_dict().values())
    assert held < 1.1 * mixed_file.stat().st_size


@torch.no_grad()
def test_mixed_file_logits_equal_the_dequantized_model(mixed_file, use_policy):
    blocks = load_model(mixed_file)
    floats = load_model(mixed_file, dequantize=True)
    assert not block_formats(floats)
    tokens = torch.randint(0, MIXED.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    want = floats(tokens)
    # prefill: dequantize + GEMM, with exact fp32 products (the bf16 ones are tested in test_quantize.py,
    # the AMX tiles that take every row count on AMX CPUs in test_amx_products_of_every_row_count)
    use_policy(gemm_dtype=torch.float32, small_batch=16)  # 48 rows: beyond the vector kernels
    ext, best = load_kernels(), load_kernels().isa()
    ext.set_isa("avx512" if best == "amx" else best)
    try:
        torch.testing.assert_close(blocks(tokens), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    finally:
        ext.set_isa(best)
    # decode steps: the integer kernels, activations rounded to int8 per block of 32
    for native, python, *_ in paired_steps(blocks, [[1, 2, 3, 4], [5, 6]], 3):
        torch.testing.assert_close(native, python, rtol=1e-4, atol=1e-4 * python.abs().max().item())
    ours = generate(blocks, [[1, 2, 3, 4]], max_tokens=8)[0].tokens
    theirs = generate(floats, [[1, 2, 3, 4]], max_tokens=8)[0].tokens
    assert ours[:2] == theirs[:2]


@torch.no_grad()
@pytest.mark.parametrize("interleave", [False, True])
def test_choosing_a_backend_interleaves_rows_as_the_policy_says(mixed_file, use_policy, interleave):
    from tramontane import KVCache
    from tramontane.generate import prefill
    from tramontane.step_backends import PythonBlocks, choose_backend

    model = load_model(mixed_file)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    want = prefill(PythonBlocks(model), tokens, KVCache.create(model.args, 1, 32), 0, chunk_size=4)
    use_policy(interleaved=frozenset(INTERLEAVED_FORMATS if interleave else ()))
    step = choose_backend(model)
    # two wo (Q5_0), the head (Q5_1), the embedding table and layer 1's wk (Q8_0)
    eights = [m for m in model.modules() if isinstance(m, BlockLinear) and m.kind in INTERLEAVED_FORMATS]
    assert len(eights) == 5 and all(m.interleaved == interleave for m in eights)
    assert not any(m.interleaved for m in model.modules() if isinstance(m, BlockLinear) and m not in eights)
    # chunks of 4 rows in the native stack: the interleaved kernels where the rows are
    got = prefill(step, tokens, KVCache.create(model.args, 1, 32), 0, chunk_size=4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_mixed_file_saves_only_when_converted(mixed_file, tmp_path):
    with pytest.raises(ValueError, match="dequantize"):
        save_model(load_model(mixed_file), tmp_path / "a", to="native")
    save_model(load_model(mixed_file, dequantize=True), tmp_path / "b", to="native")
    with pytest.raises(ValueError, match="exclude"):
        load_model(mixed_file, quantize="int8", dequantize=True)


def test_q4_projections_fuse_without_a_copy(smollm2_gguf_path, monkeypatch):
    """The demo file keeps its projections in Q4_1: the loader reads q/k/v (and w1/w3) nibbles, scales and
    minimums each into consecutive rows of one buffer, so fusing them allocates nothing, and the fused
    layer holds the file's blocks as separate loading gives them."""
    import tramontane.fuse as fuse
    from tramontane.loading.gguf import iter_gguf_tensors
    from tramontane.quantize import Int4Linear

    def no_copy(*args, **kwargs):
        raise AssertionError("fusing copied a projection: the loader did not read its parts into one buffer")

    monkeypatch.setattr(fuse, "weight_empty", no_copy)
    model = load_model(smollm2_gguf_path)
    fused = model.layers[3].attention.wqkv
    assert isinstance(fused, Int4Linear) and fused.zero_point and isinstance(model.layers[3].feed_forward.w13, Int4Linear)
    parts = dict(iter_gguf_tensors(smollm2_gguf_path, keep=("Q4_0", "Q4_1")))
    for leaf in ("weight", "scale", "mins"):
        want = torch.cat([parts[f"layers.3.attention.{p}.{leaf}"] for p in ("wq", "wk", "wv")])
        assert torch.equal(getattr(fused, leaf), want)
