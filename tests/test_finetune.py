"""Training against transformers + PEFT (loss, LoRA gradients and the step after, fp32), packing against
unpacked examples, exact resume, and gradients through frozen quantized bases."""

from __future__ import annotations

import functools
import random

import peft
import pytest
import torch
import torch.nn.functional as F

from tramontane import load_model
from tramontane.finetune import Example, TrainConfig, Trainer, make_batch
from tramontane.formats.layout import permute_native_to_hf
from tramontane.lora import LoraConfig, LoraLinear, apply_lora
from tramontane.quantize import Int4Linear, Int8Linear

HF_NAMES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
            "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}


def _examples(n: int, seed: int = 0, vocab: int = 128) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(6, 20)
        tokens = [rng.randrange(vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 2)  # the first tokens are a prompt: not scored
        out.append(Example(tokens, [False] * prompt + [True] * (length - prompt), "test"))
    return out


def _randomize(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def _hf_name(ours: str) -> tuple[str, str]:
    """Ours `layers.0.attention.wq.lora_A.weight` -> (PEFT's parameter name, projection)."""
    parts = ours.split(".")
    layer, proj, ab = parts[1], parts[3], parts[4]
    return f"base_model.model.model.layers.{layer}.{HF_NAMES[proj]}.{ab}.default.weight", proj


def _to_hf(tensor: torch.Tensor, proj: str, ab: str, model) -> torch.Tensor:
    """Our q/k rows are in Mistral's interleaved rotary order; HF's q_proj/k_proj rows are permuted."""
    if ab == "lora_B" and proj in ("wq", "wk"):
        return permute_native_to_hf(tensor, model.args.n_heads if proj == "wq" else model.args.n_kv_heads)
    return tensor


def _hf_loss(hf, examples: list[Example]) -> torch.Tensor:
    """Mean CE over every scored target, each example its own forward (no packing, no padding)."""
    total, count = torch.zeros(()), 0
    for ex in examples:
        ids = torch.tensor([ex.tokens])
        logits = hf(input_ids=ids).logits[0, :-1].float()
        target = torch.tensor(ex.tokens[1:])
        scored = torch.tensor(ex.mask[1:])
        total = total + F.cross_entropy(logits[scored], target[scored], reduction="sum")
        count += int(scored.sum())
    return total / count


@pytest.mark.parametrize("name", ["mistral-nowindow", "mistral-window", "llama-tied"])
def test_one_step_matches_peft(tiny_hf, name: str) -> None:
    hf_ref, folder = tiny_hf(name)
    torch.manual_seed(0)  # lora_A's init
    config = LoraConfig(rank=4, alpha=8)
    model = apply_lora(load_model(folder), config)
    _randomize(model)
    hf = type(hf_ref).from_pretrained(folder, attn_implementation="eager").float()
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=[v.split(".")[1] for v in HF_NAMES.values()]))
    hf_params = dict(hf.named_parameters())
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(ours) == len([p for p in hf.parameters() if p.requires_grad])
    with torch.no_grad():
        for n, p in ours.items():
            hf_name, proj = _hf_name(n)
            hf_params[hf_name].copy_(_to_hf(p, proj, n.split(".")[4], model))

    examples = _examples(3)
    trainer = Trainer(model, examples, TrainConfig(lr=1e-3, batch_tokens=1000, shuffle=False, max_grad_norm=None,
                                                   steps=2))
    batch = make_batch(examples)  # all three packed in one row, as the trainer's one batch
    loss = trainer.loss_sum(batch) / batch.n_targets
    loss.backward()
    hf_loss = _hf_loss(hf, examples)
    hf_loss.backward()
    torch.testing.assert_close(loss, hf_loss, rtol=1e-4, atol=0)
    for n, p in ours.items():
        hf_name, proj = _hf_name(n)
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        ref = hf_params[hf_name].grad
        assert ref is not None
        error = float((_to_hf(p.grad, proj, n.split(".")[4], model) - ref).norm() / ref.norm())
        assert error < 1e-4, (n, error)  # relative to the gradient's size (elements near 0 have none)

    # the optimizer step: AdamW at lr 1e-3 on both, then the loss on the same batch again
    model.zero_grad()
    trainer.train_step()
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    opt.step()
    with torch.no_grad():
        after = trainer.loss_sum(batch) / batch.n_targets
        hf_after = _hf_loss(hf, examples)
    assert after < loss
    torch.testing.assert_close(after, hf_after, rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", ["mistral-window", "mixtral", "llama-tied"])
def test_packing_equals_unpacked(tiny_hf, name: str) -> None:
    _, folder = tiny_hf(name)
    model = apply_lora(load_model(folder), LoraConfig(rank=4, alpha=8))
    _randomize(model)
    examples = _examples(4, seed=3)
    trainer = Trainer(model, examples, TrainConfig(batch_tokens=1000))
    packed = make_batch(examples)
    assert packed.tokens.shape[1] == sum(len(e.tokens) - 1 for e in examples)  # nothing padded
    loss_packed = trainer.loss_sum(packed) / packed.n_targets
    grads_packed = torch.autograd.grad(loss_packed, [p for _, p in trainer.named])
    parts = [make_batch([e]) for e in examples]
    loss_alone = sum(trainer.loss_sum(b) for b in parts) / sum(b.n_targets for b in parts)
    grads_alone = torch.autograd.grad(loss_alone, [p for _, p in trainer.named])
    torch.testing.assert_close(loss_packed, loss_alone, rtol=1e-5, atol=0)
    for a, b in zip(grads_packed, grads_alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_packed_rows_attend_per_sequence_as_the_mask_does(tiny_hf) -> None:
    from tramontane.cache import step_meta

    _, folder = tiny_hf("mistral-nowindow")
    model = load_model(folder)
    batch = make_batch(_examples(3, seed=4))
    lengths = [int((batch.segments == s).sum()) for s in range(3)]
    spans = step_meta(batch.positions, None, segments=batch.segments).spans
    assert spans is not None and [e - s for s, e in spans] == lengths
    # the same row twice (B = 2) takes the mask; so do a window shorter than a sequence and an id in two runs
    assert step_meta(batch.positions.repeat(2, 1), None, segments=batch.segments.repeat(2, 1)).spans is None
    assert step_meta(batch.positions, max(lengths) - 1, segments=batch.segments).spans is None
    assert step_meta(torch.tensor([[0, 1, 0, 0]]), None, segments=torch.tensor([[0, 0, 1, 0]])).spans is None
    with torch.no_grad():
        one = model(batch.tokens, batch.positions, segments=batch.segments)
        two = model(batch.tokens.repeat(2, 1), batch.positions.repeat(2, 1), segments=batch.segments.repeat(2, 1))
    torch.testing.assert_close(one[0], two[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one[0], two[1], rtol=1e-5, atol=1e-5)


def _run(folder, steps: int, checkpoints=None, resume=None) -> list[float]:
    model = apply_lora(load_model(folder), LoraConfig(rank=4, alpha=8, dropout=0.1))
    config = TrainConfig(lr=5e-3, warmup=2, steps=steps, batch_tokens=40, grad_accum=2, save_every=3, seed=7)
    trainer = Trainer(model, _examples(12, seed=5), config, _examples(3, seed=9))
    if resume is not None:
        trainer.resume(resume)
    return [h["loss"] for h in trainer.train(checkpoints=checkpoints)]


def test_resume_continues_exactly(tiny_hf, tmp_path) -> None:
    _, folder = tiny_hf("mistral-nowindow")
    straight = _run(folder, 8, checkpoints=tmp_path)  # 12 examples in ~5 batches: epochs turn over too
    assert (tmp_path / "checkpoint-3").is_dir() and (tmp_path / "checkpoint-6").is_dir()
    resumed = _run(folder, 8, resume=tmp_path / "checkpoint-3")
    assert resumed == straight  # the history holds the first 3 steps; the next 5 are recomputed, equal
    latest = _run(folder, 8, resume=tmp_path)  # a run's folder: its latest checkpoint (6)
    assert latest == straight


@pytest.mark.parametrize("grad_accum", [1, 4, 5])
def test_epochs_go_through_the_data_exactly(tiny_hf, grad_accum) -> None:
    """Without `steps`, 3 epochs feed every example exactly 3 times, whatever each epoch's packing,
    in ceil(batches / grad_accum) steps (the last one taking what is left)."""
    _, folder = tiny_hf("mistral-nowindow")
    examples = _examples(12, seed=5)
    model = apply_lora(load_model(folder), LoraConfig(rank=4, alpha=8))
    trainer = Trainer(model, examples, TrainConfig(lr=1e-3, epochs=3, batch_tokens=40, grad_accum=grad_accum, seed=7))
    batches = [len(trainer._plan(e)) for e in range(3)]
    history = trainer.train()
    assert len(history) == -(-sum(batches) // grad_accum)
    assert sum(h["tokens"] for h in history) == 3 * sum(len(ex.tokens) - 1 for ex in examples)


def test_resume_refuses_another_data_order(tiny_hf, tmp_path) -> None:
    _, folder = tiny_hf("mistral-nowindow")
    _run(folder, 3, checkpoints=tmp_path)
    model = apply_lora(load_model(folder), LoraConfig(rank=4, alpha=8))
    trainer = Trainer(model, _examples(12, seed=5), TrainConfig(steps=8, batch_tokens=40, grad_accum=2, seed=8))
    with pytest.raises(ValueError, match="seed was 7"):
        trainer.resume(tmp_path)


def _q8_0(weight: torch.Tensor):
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from tramontane.gguf_linear import BlockLinear

    rows = torch.from_numpy(quantize(weight.numpy(), GGMLQuantizationType.Q8_0))
    return BlockLinear.from_blocks(rows, weight.shape[1], "Q8_0")


@pytest.mark.parametrize("make", [Int8Linear.from_float, lambda w: Int4Linear.from_float(w, 32),
                                  lambda w: Int4Linear.from_float(w, 32, zero_point=True), _q8_0],
                         ids=["int8", "int4", "int4_asym", "Q8_0"])
@pytest.mark.parametrize("rows", [3, 40])  # the fused kernel's sizes and the tiled GEMM's
def test_quantized_base_passes_input_gradients(make, rows: int) -> None:
    torch.manual_seed(0)
    layer = make(torch.randn(1100, 128))  # more output rows than one tile of the backward
    x = torch.randn(2, rows, 128, requires_grad=True)
    grad_y = torch.randn(2, rows, 1100)
    layer(x).backward(grad_y)
    expected = grad_y.reshape(-1, 1100) @ layer.dequantize()
    torch.testing.assert_close(x.grad, expected.view_as(x), rtol=1e-4, atol=1e-4)
    assert all(b.grad is None for b in layer.buffers())


def test_qlora_trains_on_a_quantized_base(tiny_hf) -> None:
    _, folder = tiny_hf("mistral-nowindow")
    model = apply_lora(load_model(folder, quantize="int4"), LoraConfig(rank=4, alpha=8))
    trainer = Trainer(model, _examples(6), TrainConfig(lr=1e-2, steps=12, batch_tokens=200), _examples(2))
    before = trainer.evaluate()
    trainer.train()
    wq = model.layers[0].attention.wq
    assert isinstance(wq, LoraLinear) and isinstance(wq.base, Int4Linear)
    assert wq.lora_A.weight.grad is None and trainer.evaluate() < before


def test_full_training_updates_every_weight_and_saves_native(tiny_hf, tmp_path) -> None:
    from tramontane import save_model
    from tramontane.finetune import prepare_model

    _, folder = tiny_hf("llama-tied")
    model = prepare_model(folder, lora=None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, _examples(6), TrainConfig(lr=1e-3, steps=3, batch_tokens=200), _examples(2))
    start = trainer.evaluate()
    trainer.train()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert trainer.evaluate() < start
    save_model(model, tmp_path / "full", "native")
    tokens = torch.tensor([_examples(1)[0].tokens])
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "full")(tokens), model(tokens))
    with pytest.raises(ValueError, match="quantize: full training"):
        prepare_model(folder, lora=None, quantize="int8")


def test_bf16_autocast_step_is_close_to_fp32(tiny_hf) -> None:
    _, folder = tiny_hf("mistral-nowindow")
    losses = []
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = apply_lora(load_model(folder), LoraConfig(rank=4, alpha=8))
        _randomize(model)
        trainer = Trainer(model, _examples(4), TrainConfig(batch_tokens=1000, bf16=bf16))
        batch = make_batch(_examples(4))
        losses.append(float(trainer.loss_sum(batch) / batch.n_targets))
    assert losses[1] == pytest.approx(losses[0], rel=3e-2)


def _loss_and_grads(model: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    trainer = Trainer(model, _examples(4), TrainConfig(batch_tokens=1000))
    batch = make_batch(_examples(4))
    loss = trainer.loss_sum(batch) / batch.n_targets
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in trainable])
    return float(loss), {n: g for (n, _), g in zip(trainable, grads, strict=True)}


@pytest.mark.parametrize("name", ["llama-tied", "mistral-nowindow"])
def test_bf16_frozen_products_keep_the_loss_and_gradients(tiny_hf, name: str) -> None:
    from tramontane.lora import FrozenLinear, lower_frozen

    _, folder = tiny_hf(name)
    runs = []
    for lowered in (False, True):
        torch.manual_seed(0)  # the same A init
        model = apply_lora(load_model(folder), LoraConfig(rank=4, alpha=8))
        _randomize(model)
        if lowered:
            lower_frozen(model, torch.bfloat16)
        runs.append((model, *_loss_and_grads(model)))
    (_, loss32, grads32), (model, loss16, grads16) = runs
    wq = model.layers[0].attention.wq
    assert isinstance(wq, LoraLinear) and isinstance(wq.base, FrozenLinear)
    assert wq.base.weight.dtype == torch.bfloat16 and wq.lora_A.weight.dtype == torch.float32
    assert isinstance(model.output, FrozenLinear) and model.output.weight.dtype == torch.bfloat16
    assert model.tok_embeddings.weight.dtype == torch.float32  # the lookup keeps the table, tied or not
    assert loss16 == pytest.approx(loss32, rel=5e-3) and loss16 != loss32
    assert grads16.keys() == grads32.keys()
    for key, g in grads16.items():
        assert g.dtype == torch.float32
        assert F.cosine_similarity(g.flatten(), grads32[key].flatten(), dim=0) > 0.995, key


@pytest.mark.parametrize("frozen", [torch.float32, torch.bfloat16])
def test_prepare_model_keeps_frozen_products_in_the_policys_dtype(tiny_hf, use_policy, frozen) -> None:
    from tramontane.finetune import prepare_model

    _, folder = tiny_hf("mistral-nowindow")
    use_policy(gemm_dtype=frozen)
    model = prepare_model(folder, LoraConfig(rank=4))
    assert model.layers[0].feed_forward.w2.base.weight.dtype == frozen
    assert prepare_model(folder, LoraConfig(rank=4), base_dtype=torch.float32).output.weight.dtype == torch.float32
    assert isinstance(prepare_model(folder, LoraConfig(rank=4), quantize="int8").layers[0].attention.wq.base,
                      Int8Linear)


def _note_size(sizes: list[int], t: torch.Tensor) -> torch.Tensor:
    sizes.append(t.numel() * t.element_size())
    return t


@pytest.mark.parametrize(("name", "quantize"), [("mistral-window", None), ("mixtral", None), ("mistral-nowindow", "int4")])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_hf, name: str, quantize: str | None) -> None:
    # dropout on: the recomputed blocks must draw the same masks as the first pass
    _, folder = tiny_hf(name)
    model = apply_lora(load_model(folder, quantize=quantize), LoraConfig(rank=4, alpha=8, dropout=0.1))
    _randomize(model)
    model.train()
    batch = make_batch(_examples(4, seed=3))
    results, held = [], []
    for recompute in (False, True):
        trainer = Trainer(model, _examples(4), TrainConfig(batch_tokens=1000, gradient_checkpointing=recompute))
        torch.manual_seed(7)
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_note_size, sizes), lambda t: t):
            loss = trainer.loss_sum(batch) / batch.n_targets  # sizes: what the forward keeps for the backward
        held.append(sum(sizes))
        results.append((loss, torch.autograd.grad(loss, [p for _, p in trainer.named])))
    assert held[1] < 0.5 * held[0], held  # only each block's input, not its activations
    (loss_kept, grads_kept), (loss_again, grads_again) = results
    torch.testing.assert_close(loss_again, loss_kept, rtol=0, atol=0)
    for a, b in zip(grads_again, grads_kept, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_cli_turns_gradient_checkpointing_on_for_quantized_bases() -> None:
    from tramontane.cli import build_parser
    from tramontane.finetune.cli import training_config

    def config(*flags: str) -> TrainConfig:
        return training_config(build_parser().parse_args(["finetune", "--model", "m", "--data", "d", *flags]))

    assert not config().gradient_checkpointing
    assert config("--quantize", "int4").gradient_checkpointing
    assert not config("--quantize", "int4", "--no-gradient-checkpointing").gradient_checkpointing
    assert config("--gradient-checkpointing").gradient_checkpointing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_cross_entropy_walks_the_vocabulary_in_slices_exactly(dtype) -> None:
    from tramontane.finetune.loss import VOCAB_SLICE, head_cross_entropy

    vocab = 2 * VOCAB_SLICE + 123  # three slices, the last a short one
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, 48, generator=g) * 0.5).to(dtype)
    h = torch.randn(37, 48, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (37,), generator=g)
    targets[:3] = torch.tensor([0, VOCAB_SLICE, vocab - 1])  # slice edges
    loss = head_cross_entropy(h, weight, targets)
    (grad,) = torch.autograd.grad(loss * 0.5, h)  # the backward scales by the incoming gradient
    ref_h = h.detach().clone().requires_grad_(True)
    logits = torch.nn.functional.linear(ref_h.to(dtype), weight).float()  # as FrozenLinear multiplies
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    (ref * 0.5).backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the slices' products round separately
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    assert float((grad - ref_h.grad).norm() / ref_h.grad.norm()) < tol


def test_the_fused_loss_takes_frozen_float_heads_only(tiny_hf) -> None:
    from tramontane.finetune import prepare_model
    from tramontane.lora import frozen_head

    _, folder = tiny_hf("mistral-nowindow")
    lora = prepare_model(folder, LoraConfig(rank=4), base_dtype=torch.bfloat16)
    assert frozen_head(lora) is lora.output.weight and lora.output.weight.dtype == torch.bfloat16
    assert frozen_head(prepare_model(folder, lora=None)) is None  # full training: the head trains
    _, tied = tiny_hf("llama-tied")
    model = prepare_model(tied, LoraConfig(rank=4), base_dtype=torch.float32)
    assert model.output is None and frozen_head(model) is model.tok_embeddings.weight
