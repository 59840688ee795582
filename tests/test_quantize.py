"""Weight-only int8/int4: the kernels against plain PyTorch, models through load and save, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from tramontane import generate, load_model
from tramontane.kernels import load_kernels
from tramontane.loading import save_model
from tramontane.quantize import (
    Int4Linear,
    Int8Linear,
    QuantConfig,
    dequantize_int4,
    dequantize_int8,
    interleave_int4,
    quantize_int4,
    quantize_int8,
    rows_in_order,
)

from console import tramontane

ISAS = ["portable", "avx2", "avx_vnni", "avx512", "amx"]  # those this CPU lacks are skipped, saying so


@pytest.fixture(scope="module")
def ext():
    module = load_kernels()
    assert module is not None, "the kernel extension must build here (gcc and the Python headers are present)"
    best = module.isa()
    yield module
    module.set_isa(best)


@pytest.fixture(autouse=True)
def isa_restored():
    """Each test leaves the instruction set it found (the CPU's best), whatever `available` chose in it: the
    kernel policy's checks below read the instruction set in use."""
    module = load_kernels()
    found = module.isa() if module is not None else None
    yield
    if module is not None and found is not None:
        module.set_isa(found)


@pytest.fixture
def vector_kernels(ext):
    """The vector kernels at every batch size: without AMX, whose bf16 products the tests of fp32 (int8)
    and int8-rounded (int4) activations would not expect (tested on their own)."""
    best = ext.isa()
    if best == "amx":
        ext.set_isa("avx512")
    yield
    ext.set_isa(best)


def available(ext, isa: str) -> bool:
    """Whether this CPU has `isa`; if so, it is now in use."""
    if isa not in ext.isas():
        return False
    ext.set_isa(isa)
    return True


def test_roundtrip_error_is_within_half_a_step():
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    q, s = quantize_int8(w)
    assert ((dequantize_int8(q, s) - w).abs() <= s[:, None] / 2 + 1e-6).all()
    packed, scale, none = quantize_int4(w, 64)
    assert packed.shape == (48, 64) and scale.shape == (48, 2) and scale.dtype == torch.float16 and none is None
    deq = dequantize_int4(packed, scale)
    step = scale.float().abs()[..., None]
    err = (deq - w).abs().view(48, 2, 64)
    # within half a step, but for values beyond 7 steps on the side opposite the extreme (clamped, as Q4_0)
    inside = (w.view(48, 2, 64) / scale.float()[..., None]).round() <= 7
    assert (err[inside] <= (step / 2 + 1e-3 * step).expand_as(err)[inside]).all()
    assert (err <= step * 1.01).all()  # one step, the float16 rounding of the scale aside
    # the largest magnitude of each group is exact up to the float16 scale: it maps to q = 0 (-8 steps)
    extreme = w.view(48, 2, 64).abs().amax(-1)
    assert torch.allclose(deq.view(48, 2, 64).abs().amax(-1), extreme, rtol=1e-3)
    # with a zero point every value is within half a step, and the minimum is stored
    packed, scale, mins = quantize_int4(w, 64, zero_point=True)
    deq = dequantize_int4(packed, scale, mins)
    step = scale.float()[..., None]
    assert ((deq - w).abs().view(48, 2, 64) <= step / 2 + 2e-3 * step + 1e-3).all()


def bf16_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the AMX kernel computes: x and the weights rounded to bf16, products summed in (here) float64."""
    return (x.bfloat16().double() @ w.bfloat16().double().T).float()


def quantize_activations(x: torch.Tensor, parts: int = 2) -> torch.Tensor:
    """What the integer kernels (int4, GGUF block formats) multiply: per block of 32, step d = max|x| / 127,
    inv = 127 / max|x|, x in two int8 parts, q = round(x inv) and r = round(256 fma(x, inv, -q)) (saturated),
    x = d (q + r / 256); with one part (`set_activation_parts(1)`) x = d q. (The fma: x inv - q exact in
    float64, then rounded once to float32.)"""
    blocks = x.view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    # 127 / max|x| rounded once, as the C++ divides (torch's scalar / tensor multiplies by a reciprocal)
    inv = torch.where(amax > 0, (127.0 / amax.double()).float(), torch.zeros_like(amax))
    q = torch.round(blocks * inv)
    if parts == 1:
        return (q * (amax / 127)).view_as(x)
    r = torch.round((blocks.double() * inv.double() - q.double()).float() * 256).clamp(-128, 127)
    return ((q * 256 + r) * (amax / 127 / 256)).view_as(x)


@pytest.fixture
def one_part(ext):
    """The integer kernels' activations in one int8 part for the test (the policy's other choice)."""
    before = ext.activation_parts()
    ext.set_activation_parts(1)
    yield
    ext.set_activation_parts(before)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 13, 40])
@pytest.mark.parametrize(("N", "K"), [(67, 96), (128, 200), (9, 64)])
def test_int8_kernel_matches_reference(ext, isa, M, N, K):
    if not available(ext, isa):
        pytest.skip(f"this CPU has no {isa}")
    g = torch.Generator().manual_seed(M * N + K)
    q, s = quantize_int8(torch.randn(N, K, generator=g))
    x = torch.randn(M, K, generator=g)
    y, exact = ext.int8_linear(x, q, s), x @ dequantize_int8(q, s).T
    if isa == "amx" and M >= ext.AMX_MIN_ROWS_INT8 and K % 32 == 0:
        # int8 values are exact in bf16: only the activations are rounded; the row scale comes last
        torch.testing.assert_close(y, bf16_product(x, q.float()) * s, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(y, exact, atol=1e-4, rtol=1e-4), "expected the AMX path"
    else:
        torch.testing.assert_close(y, exact, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 3, 4, 5, 6, 16, 29, 50])
@pytest.mark.parametrize(("N", "K", "G"), [(67, 96, 32), (130, 256, 64), (5, 128, 128), (9, 608, 32)])
@pytest.mark.parametrize("zero_point", [False, True])
def test_int4_kernel_matches_reference(ext, isa, M, N, K, G, zero_point):
    if not available(ext, isa):
        pytest.skip(f"this CPU has no {isa}")
    g = torch.Generator().manual_seed(M * N + K)
    packed, scale, mins = quantize_int4(torch.randn(N, K, generator=g) + 0.3, G, zero_point)
    x = torch.randn(M, K, generator=g)
    x[0, :32] = 0  # an all-zero block has scale 0
    w = dequantize_int4(packed, scale, mins)
    y = ext.int4_linear(x, packed, scale, mins, G)
    integer = quantize_activations(x) @ w.T
    if isa == "amx" and M >= ext.AMX_MIN_ROWS_INT4:
        # bf16 tiles: 1, 2 or more chunks of 16 rows of x, 32-row units of weights with a partial last one
        torch.testing.assert_close(y, bf16_product(x, w), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(y, integer, atol=1e-3, rtol=1e-3), "expected the AMX path"
    else:
        torch.testing.assert_close(y, integer, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 3, 5, 29])
@pytest.mark.parametrize(("N", "K", "G"), [(67, 96, 32), (130, 256, 64), (9, 608, 32)])
@pytest.mark.parametrize("zero_point", [False, True])
def test_int4_kernel_with_one_activation_part(ext, one_part, isa, M, N, K, G, zero_point):
    if not available(ext, isa):
        pytest.skip(f"this CPU has no {isa}")
    if isa == "amx" and M >= ext.AMX_MIN_ROWS_INT4:
        pytest.skip("AMX tiles take bf16 activations, whatever the parts")
    g = torch.Generator().manual_seed(M * N + K)
    packed, scale, mins = quantize_int4(torch.randn(N, K, generator=g) + 0.3, G, zero_point)
    x = torch.randn(M, K, generator=g)
    x[0, :32] = 0
    w = dequantize_int4(packed, scale, mins)
    y = ext.int4_linear(x, packed, scale, mins, G)
    torch.testing.assert_close(y, quantize_activations(x, parts=1) @ w.T, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(y, quantize_activations(x) @ w.T, atol=1e-4, rtol=1e-4), "expected one part"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 3, 4, 5, 16])
@pytest.mark.parametrize(("N", "K", "G"), [(8, 96, 32), (136, 256, 64), (16, 608, 32)])
@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("parts", [1, 2])
def test_interleaved_int4_kernel_matches_reference(ext, isa, M, N, K, G, zero_point, parts):
    if not available(ext, isa):
        pytest.skip(f"this CPU has no {isa}")
    g = torch.Generator().manual_seed(M * N + K)
    packed, scale, mins = quantize_int4(torch.randn(N, K, generator=g) + 0.3, G, zero_point)
    x = torch.randn(M, K, generator=g)
    x[0, :32] = 0
    w = dequantize_int4(packed, scale, mins)
    before = ext.activation_parts()
    ext.set_activation_parts(parts)
    try:  # every path, AMX's too, takes the interleaved rows through the vector kernel
        y = ext.int4_linear(x, *interleave_int4(packed, scale, mins), G, interleaved=True)
    finally:
        ext.set_activation_parts(before)
    torch.testing.assert_close(y, quantize_activations(x, parts) @ w.T, atol=1e-4, rtol=1e-4)


def test_interleaving_permutes_within_groups_of_eight_rows():
    packed, scale, mins = quantize_int4(torch.randn(16, 64), 32, zero_point=True)
    w8, s8, m8 = interleave_int4(packed, scale, mins)
    # block 1 of rows 8..15: half p holds bytes 8p..8p+7 of each row in turn
    assert torch.equal(w8[8:16].reshape(-1)[128:256].view(2, 8, 8), packed[8:16, 16:32].view(8, 2, 8).transpose(0, 1))
    assert torch.equal(s8[8:16].reshape(-1)[8:16], scale[8:16, 1]) and torch.equal(m8[:8].reshape(-1)[:8], mins[:8, 0])
    for got, want in zip(rows_in_order(w8, s8, m8), (packed, scale, mins)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("kernels", [True, False])
def test_interleaved_layer_keeps_its_outputs_rows_and_state_dict(zero_point, kernels, monkeypatch, vector_kernels):
    import tramontane.quantize as quantize

    if not kernels:
        monkeypatch.setattr(quantize, "load_kernels", lambda: None)
    layer = Int4Linear.from_float(torch.randn(48, 64), 32, zero_point)
    x, big = torch.randn(3, 64), torch.randn(40, 64)  # big: dequantize + GEMM
    rows = [slice(None), slice(8, 24), slice(3, 11), slice(40, None), torch.tensor([5, 0, 47, 5])]
    before = ([layer.dequantize(r) for r in rows], layer(x), layer(big),
              {k: v.clone() for k, v in layer.state_dict().items()})
    layer.interleave()
    assert layer.interleaved and "interleaved=True" in repr(layer)
    assert not torch.equal(layer.weight, before[3]["weight"])
    for got, want in zip([layer.dequantize(r) for r in rows], before[0]):
        assert torch.equal(got, want)
    torch.testing.assert_close(layer(x), before[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(big), before[2], atol=1e-5, rtol=1e-5)
    state = layer.state_dict()
    assert state.keys() == before[3].keys() and all(torch.equal(state[k], before[3][k]) for k in state)
    other = Int4Linear.from_float(torch.randn(48, 64), 32, zero_point)
    other.interleave()
    other.load_state_dict(before[3])  # rows in order, as checkpoints hold them
    assert other.interleaved and torch.equal(other.weight, layer.weight)
    layer.in_order()
    assert not layer.interleaved and torch.equal(layer.weight, before[3]["weight"])
    with pytest.raises(ValueError, match="44 output rows cannot be interleaved"):
        Int4Linear.from_float(torch.randn(44, 64), 32).interleave()


def test_activation_parts_are_one_or_two(ext):
    with pytest.raises(RuntimeError, match="must be 1 or 2"):
        ext.set_activation_parts(3)
    assert ext.activation_parts() in (1, 2)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 2, 5, 16])
def test_f32_kernel_and_fast_linear_match_matmul(ext, isa, M):
    from tramontane.fuse import FastLinear

    if not available(ext, isa):
        pytest.skip(f"this CPU has no {isa}")
    g = torch.Generator().manual_seed(M)
    w, x = torch.randn(70, 100, generator=g), torch.randn(M, 100, generator=g)
    torch.testing.assert_close(ext.f32_linear(x, w), x @ w.T, atol=1e-4, rtol=1e-4)
    layer = FastLinear(100, 70, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
        torch.testing.assert_close(layer(x.view(M, 1, 100)), (x @ w.T).view(M, 1, 70), atol=1e-4, rtol=1e-4)


def test_int4_dequantize_kernel_matches_reference(ext):
    for zero_point in (False, True):
        packed, scale, mins = quantize_int4(torch.randn(33, 192), 64, zero_point)
        torch.testing.assert_close(ext.int4_dequantize(packed, scale, mins, 64), dequantize_int4(packed, scale, mins))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("zero_point", [False, True])
def test_bf16_dequantize_rounds_as_tensor_to(interleaved, zero_point):
    # bf16 tiles for prefill come straight from the weights: the same bits as fp32 rounded by Tensor.to,
    # for every row selection (whole groups of 8, parts of groups, index tensors)
    layer = Int4Linear.from_float(torch.randn(48, 256), 32, zero_point)
    if interleaved:
        layer.interleave()
    for rows in (slice(None), slice(8, 24), slice(3, 17), torch.tensor([5, 1, 47])):
        want = layer.dequantize(rows).bfloat16()
        got = layer.dequantize(rows, torch.bfloat16)
        assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), want.view(torch.int16)), rows
    nan = torch.full((8, 32), float("nan"))
    assert Int4Linear.from_float(nan, 32).dequantize(dtype=torch.bfloat16).isnan().all()


@pytest.mark.parametrize("gemm", [torch.float32, torch.bfloat16])
def test_modules_use_kernel_and_fallback_alike(use_policy, gemm, vector_kernels):
    # 40 output rows: big inputs go through 3 tiles; bf16 is what CPUs with AMX use
    use_policy(prefill_tile=16, gemm_dtype=gemm, small_batch=16)  # 40 rows: beyond the vector kernels
    w = torch.randn(40, 64)
    for layer in (Int8Linear.from_float(w), Int4Linear.from_float(w, 32), Int4Linear.from_float(w, 32, True)):
        small, big = torch.randn(2, 3, 64), torch.randn(40, 64)  # big goes through dequantize + matmul
        ref = layer.dequantize()
        # the int4 kernel multiplies int8-rounded activations, as llama.cpp's Q4_0 kernels do
        seen = small if isinstance(layer, Int8Linear) else quantize_activations(small.view(6, 64)).view(2, 3, 64)
        torch.testing.assert_close(layer(small), seen @ ref.T, atol=1e-4, rtol=1e-4)
        out = layer(big)
        assert out.dtype == torch.float32 and out.is_contiguous()
        if gemm == torch.float32:
            torch.testing.assert_close(out, big @ ref.T, atol=1e-4, rtol=1e-4)
        else:  # bf16 operands, fp32 accumulation
            expected = (big.bfloat16().float() @ ref.bfloat16().float().T)
            torch.testing.assert_close(out, expected, atol=2e-2, rtol=1e-2)
            assert not torch.allclose(out, big @ ref.T, atol=1e-6, rtol=1e-6), "expected the bf16 product"


def test_quantized_layers_take_the_amx_kernel_at_every_batch_size(ext, use_policy):
    if not available(ext, "amx"):
        pytest.skip("this CPU has no AMX")
    use_policy(prefill_tile=16)  # (were the dequantize + GEMM path taken)
    w = torch.randn(40, 64)
    for layer in (Int4Linear.from_float(w, 32), Int4Linear.from_float(w, 32, True), Int8Linear.from_float(w)):
        int8 = isinstance(layer, Int8Linear)
        for rows in (ext.AMX_MIN_ROWS_INT8 if int8 else ext.AMX_MIN_ROWS_INT4, 40):  # 40 > small_batch: prefill
            x = torch.randn(rows, 64)
            expected = bf16_product(x, layer.weight.float()) * layer.scale if int8 else bf16_product(x, layer.dequantize())
            torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)


def test_gemm_dtype_follows_the_measured_bf16_rate(monkeypatch):
    import tramontane.kernels.policy as policy_module
    from tramontane.kernels.policy import BF16_MIN_SPEEDUP, KernelPolicy, bf16_speedup, kernel_policy

    # bf16 where this CPU's bf16 GEMM is clearly faster (AMX, Zen 4), fp32 where it is not (a Xeon held
    # to AVX512-BF16), whatever flags the CPU shows
    policy = kernel_policy()
    assert policy.gemm_dtype == (torch.bfloat16 if bf16_speedup() >= BF16_MIN_SPEEDUP else torch.float32)
    assert policy is kernel_policy() and KernelPolicy.detect() == policy  # decided once, the same every time
    assert KernelPolicy.detect(lambda: 0.5).gemm_dtype == torch.float32
    assert KernelPolicy.detect(lambda: BF16_MIN_SPEEDUP - 0.01).gemm_dtype == torch.float32
    assert KernelPolicy.detect(lambda: 2.5).gemm_dtype == torch.bfloat16
    monkeypatch.setattr(policy_module, "load_kernels", lambda: None)  # no kernels: plain PyTorch, fp32
    assert KernelPolicy.detect(lambda: 2.5).gemm_dtype == torch.float32


def test_policy_keeps_freed_memory_for_the_next_step(ext, monkeypatch):
    # the policy applies its heap thresholds once per process, when it is decided (what they gain is a
    # prefill benchmark's to show: page faults depend on the heap's history, not on one test)
    import tramontane.kernels.policy as policy_module
    from tramontane.kernels.policy import KernelPolicy

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(ext, "keep_heap", lambda below, keep: calls.append((below, keep)))
    monkeypatch.setattr(policy_module, "load_kernels", lambda: ext)
    policy = KernelPolicy.detect(lambda: 1.0)
    assert calls == [(policy.heap_mmap_below, policy.heap_keep)]
    assert 128 << 10 < policy.heap_mmap_below <= 32 << 20 < policy.heap_keep  # within glibc's own range


def test_the_vector_kernels_row_limit_is_the_instruction_sets(ext, monkeypatch):
    # where the vector kernels stop beating dequantize + GEMM depends on how fast they multiply a row:
    # with VNNI far later than with AVX2's pair sums (benchmarks/vector_rows.py)
    import tramontane.kernels.policy as policy_module
    from tramontane.kernels.policy import SMALL_BATCH, KernelPolicy

    monkeypatch.setattr(policy_module, "load_kernels", lambda: ext)
    for isa in SMALL_BATCH:
        monkeypatch.setattr(ext, "isa", lambda isa=isa: isa)
        monkeypatch.setattr(ext, "set_activation_parts", lambda parts: None)
        monkeypatch.setattr(ext, "keep_heap", lambda below, keep: None)
        assert KernelPolicy.detect(lambda: 1.0).small_batch == SMALL_BATCH[isa]
    assert SMALL_BATCH["avx2"] < SMALL_BATCH["avx_vnni"] == SMALL_BATCH["avx512"]
    monkeypatch.setattr(ext, "isa", lambda: "avx512")
    policy = KernelPolicy.detect(lambda: 1.0)
    assert policy.vector_wins(rows=64, amx_tiles=False, in_features=64)
    assert not policy.vector_wins(rows=65, amx_tiles=False, in_features=64)


def test_bf16_rate_is_measured_once_per_cpu_and_kept(monkeypatch, tmp_path):
    import tramontane.kernels.policy as policy_module
    from tramontane.kernels.policy import bf16_speedup, measure_bf16_speedup

    assert measure_bf16_speedup(m=16, k=64, n=32) > 0
    measured: list[float] = []

    def measure() -> float:
        measured.append(2.0)
        return 2.0

    monkeypatch.setattr(policy_module, "measure_bf16_speedup", measure)
    path = tmp_path / "rates.json"
    assert bf16_speedup(path) == 2.0 and bf16_speedup(path) == 2.0
    assert len(measured) == 1  # the second answer came from the file
    (key,) = json.loads(path.read_text())
    assert torch.__version__ in key and policy_module.cpu_name() in key
    path.write_text("not json")  # a damaged file is measured again and rewritten
    assert bf16_speedup(path) == 2.0 and len(measured) == 2 and json.loads(path.read_text())[key] == 2.0


@torch.no_grad()
@pytest.mark.parametrize("method", ["int8", "int4", "int4_asym"])
def test_quantized_model_equals_fp32_model_with_dequantized_weights(tiny_name, tiny_hf, method, use_policy,
                                                                   vector_kernels):
    use_policy(gemm_dtype=torch.float32)  # exact products (bf16: tested above)
    _, folder = tiny_hf(tiny_name)
    model = load_model(folder, quantize=method)
    assert model.quantization == QuantConfig(method)
    # the same maths in plain fp32: every 2-D weight but the MoE router replaced by its dequantized self
    sim = load_model(folder)
    for name, p in sim.named_parameters():
        if p.dim() == 2 and not name.endswith("feed_forward.gate.weight"):
            p.copy_(dequantize_int8(*quantize_int8(p)) if method == "int8"
                    else dequantize_int4(*quantize_int4(p, 32, method == "int4_asym")))
    x = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    # the kernels on: int8 multiplies fp32 activations, int4 splits them into two int8 parts first
    short = x[:, :6]  # 12 rows: every quantized linear takes the small-batch kernel
    hooks = []

    def rounded(t: torch.Tensor) -> torch.Tensor:
        return quantize_activations(t.reshape(-1, t.shape[-1])).view_as(t)

    if method != "int8":
        for name, m in sim.named_modules():
            if isinstance(m, torch.nn.Linear) and not name.endswith("feed_forward.gate"):
                hooks.append(m.register_forward_pre_hook(lambda _, args: rounded(args[0])))
        if sim.output is None:  # a tied head multiplies the final norm's output by the embeddings
            hooks.append(sim.norm.register_forward_hook(lambda _m, _a, out: rounded(out)))
    # (int4: a last-bit difference upstream can carry an activation across a rounding boundary of its second
    # part, a step of d / 256; each kernel alone matches the rounding to 1e-4 in test_int4_kernel_matches_reference)
    tol = 1e-4 if method == "int8" else 1e-3
    torch.testing.assert_close(model(short), sim(short), atol=tol, rtol=1e-4)
    for h in hooks:
        h.remove()
    # ... and off: dequantize-and-matmul is the fp32 model exactly, in a full forward and through the cache
    use_policy(gemm_dtype=torch.float32, small_batch=0)
    torch.testing.assert_close(model(x), sim(x), atol=1e-4, rtol=1e-4)
    out = generate(model, [x[0].tolist()], max_tokens=12)[0].tokens
    full = model(torch.tensor([x[0].tolist() + out]))[0, 19:-1].argmax(-1).tolist()
    assert full == out


@torch.no_grad()
@pytest.mark.parametrize("name", ["mistral-window", "mistral-nowindow", "llama-tied"])  # MoE routing flips
def test_int8_is_far_closer_to_fp32_than_int4(name, tiny_hf):
    _, folder = tiny_hf(name)
    ref = load_model(folder)
    x = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    b = ref(x)
    err = {m: ((load_model(folder, quantize=m)(x) - b).norm() / b.norm()).item() for m in ("int8", "int4", "int4_asym")}
    # random tiny weights are harsher than trained ones (the SmolLM2 benchmark measures perplexity)
    assert err["int8"] < 0.06 and err["int8"] < err["int4"] / 4 and err["int8"] < err["int4_asym"] / 4, err


@torch.no_grad()
@pytest.mark.parametrize("method", ["int8", "int4", "int4_asym"])
def test_saved_quantized_checkpoint_loads_without_requantizing(tiny_name, tiny_hf, tmp_path, method):
    _, folder = tiny_hf(tiny_name)
    model = load_model(folder, quantize=method)
    save_model(model, tmp_path / "q", to="native")
    params = json.loads((tmp_path / "q" / "params.json").read_text())
    assert params["quantization"]["method"] == method
    again = load_model(tmp_path / "q")
    x = torch.randint(0, 128, (1, 16))
    torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="already quantized"):
        load_model(tmp_path / "q", quantize="int8" if method != "int8" else "int4")
    with pytest.raises(ValueError, match="only be saved as a native folder"):
        save_model(model, tmp_path / "hf", to="hf")


def test_quantize_cli_and_flag(tiny_hf, tmp_path):
    _, folder = tiny_hf("llama-tied")
    r = tramontane("quantize", str(folder), str(tmp_path / "q4"), "--to", "int4", "--quiet")
    assert r.returncode == 0, r.stderr
    q4 = tmp_path / "q4" / "consolidated.safetensors"
    assert q4.stat().st_size < (folder / "model.safetensors").stat().st_size / 3
    r = tramontane("quantize", str(folder), str(tmp_path / "bad"), "--to", "int4", "--group-size", "48")
    assert r.returncode == 1 and "group_size must be a positive multiple of 32" in r.stderr
    r = tramontane("info", str(tmp_path / "q4"), "--json")
    assert json.loads(r.stdout)["quantization"] == "int4"


def test_bad_scheme_names_the_parameter():
    with pytest.raises(ValueError, match="quantize: method must be one of int8, int4"):
        QuantConfig("int3")


def test_quantizing_in_row_chunks_changes_nothing(monkeypatch):
    import tramontane.quantize as quantize

    w = torch.randn(50, 128, generator=torch.Generator().manual_seed(3))
    whole = [quantize_int8(w), quantize_int4(w, 32), quantize_int4(w, 64, zero_point=True)]
    monkeypatch.setattr(quantize, "QUANTIZE_ROWS", 7)  # 8 chunks, the last one short
    chunked = [quantize_int8(w), quantize_int4(w, 32), quantize_int4(w, 64, zero_point=True)]
    for a, b in zip(whole, chunked):
        for x, y in zip(a, b):
            assert (x is None and y is None) or torch.equal(x, y)


def test_the_interleaved_formats_are_the_instruction_sets(ext, monkeypatch):
    # rows interleaved by eights where they multiply faster: never with AMX (its tiles read rows in order),
    # Q8_0 only with VNNI (AVX2 alone multiplies its 8-bit codes as nibbles there: policy.INTERLEAVED)
    import tramontane.kernels.policy as policy_module
    from tramontane.kernels.policy import KernelPolicy

    monkeypatch.setattr(policy_module, "load_kernels", lambda: ext)
    monkeypatch.setattr(ext, "set_activation_parts", lambda parts: None)
    monkeypatch.setattr(ext, "keep_heap", lambda below, keep: None)
    formats = {}
    for isa in ("amx", "avx512", "avx_vnni", "avx2", "portable"):
        monkeypatch.setattr(ext, "isa", lambda isa=isa: isa)
        formats[isa] = KernelPolicy.detect(lambda: 1.0).interleaved
    assert formats["amx"] == frozenset()
    assert formats["avx512"] == formats["avx_vnni"] == {"int4", "Q5_0", "Q5_1", "Q8_0"}
    assert formats["avx2"] == formats["portable"] == {"int4", "Q5_0", "Q5_1"}
