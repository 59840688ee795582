"""On an accelerator (CUDA), the model, generation, the engine, adapters and training give what the CPU
gives: the same logits (fp32, 1e-4), the same greedy tokens, the same loss, gradients and steps.

Skipped where torch sees no CUDA device, which is every CI run: a GPU run happens where a session has
one. `TRAMONTANE_TEST_DEVICE=cpu` runs the same comparisons on the CPU itself, to check the tests.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_engine import Collector, IdTokenizer, prompt, run_all
from test_finetune import _examples, _randomize

from tramontane import generate, load_model
from tramontane.engine import Engine, Request
from tramontane.finetune import TrainConfig, Trainer, make_batch, prepare_model
from tramontane.lora import LoraConfig, apply_lora
from tramontane.lora.adapters import save_adapter

DEVICE = torch.device(os.environ.get("TRAMONTANE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device: these tests compare a GPU's results with the CPU's")


@pytest.fixture(autouse=True)
def full_fp32_products():
    """fp32 products in fp32 on the GPU too (no TF32), so that 1e-4 holds. (Not monkeypatch: the flag
    is no real attribute, and monkeypatch's undo deletes it.)"""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _tokens(batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(3))


def test_logits_match_the_cpu(tiny_hf, tiny_name: str) -> None:
    _, folder = tiny_hf(tiny_name)
    tokens = _tokens()
    with torch.no_grad():
        cpu = load_model(folder)(tokens)
        model = load_model(folder, device=DEVICE)
        assert model.device.type == DEVICE.type
        dev = model(tokens.to(DEVICE))
    assert dev.device.type == DEVICE.type
    torch.testing.assert_close(dev.cpu(), cpu, rtol=1e-4, atol=1e-4)


def test_bf16_logits_are_close_to_fp32(tiny_hf) -> None:
    _, folder = tiny_hf("mistral-window")
    tokens = _tokens()
    with torch.no_grad():
        fp32 = load_model(folder)(tokens)
        cpu_bf16 = load_model(folder, torch.bfloat16)(tokens).float()
        bf16 = load_model(folder, torch.bfloat16, DEVICE)(tokens.to(DEVICE)).float().cpu()
    # bf16's rounding, not more: within twice the CPU's bf16 error
    assert (bf16 - fp32).abs().max() <= 2 * (cpu_bf16 - fp32).abs().max()
    assert (bf16.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.9


def test_greedy_generation_matches_the_cpu(tiny_hf, tiny_name: str) -> None:
    _, folder = tiny_hf(tiny_name)
    prompts = [prompt(1, 5), prompt(2, 19)]  # the window model's 8 positions roll over
    cpu = generate(load_model(folder), prompts, max_tokens=12)
    dev = generate(load_model(folder, device=DEVICE), prompts, max_tokens=12)
    assert [g.tokens for g in dev] == [g.tokens for g in cpu]


def test_inductor_compiled_decode_gives_the_eager_tokens(tiny_hf) -> None:
    """torch.compile with Inductor (the GPU's reason for --compile); the CPU tests trace with aot_eager."""
    from tramontane import compile_decode

    _, folder = tiny_hf("mistral-window")
    model = load_model(folder, device=DEVICE)
    prompts = [[5, 9, 12, 3, 7], [40, 41]]
    eager = [g.tokens for g in generate(model, prompts, max_tokens=8)]
    compile_decode(model)
    assert [g.tokens for g in generate(model, prompts, max_tokens=8)] == eager
    assert model.__dict__["_compiled_decode"].compiled is not None, "compilation failed and fell back"


def test_engine_batches_match_the_cpu(tiny_hf) -> None:
    _, folder = tiny_hf("mistral-window")
    model = load_model(folder, device=DEVICE)
    sink = Collector()
    engine = Engine(model, IdTokenizer(), max_batch=4, chunk_size=5)
    reqs = [Request(prompt(i, n), max_tokens=6 + i, emit=sink) for i, n in enumerate([3, 17, 9, 1, 30, 12])]
    run_all(engine, reqs, sink)
    cpu = load_model(folder)
    for r in reqs:
        assert sink.tokens(r.id) == generate(cpu, [r.prompt], max_tokens=r.max_tokens)[0].tokens


def _lora_model(folder, device: torch.device | str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same A init on both
    model = apply_lora(load_model(folder), LoraConfig(rank=4, alpha=8))
    _randomize(model)
    return model.to(device)


def test_lora_loss_and_gradients_match_the_cpu(tiny_hf) -> None:
    _, folder = tiny_hf("llama-tied")
    batch = make_batch(_examples(4))
    results = []
    for device in ("cpu", DEVICE):
        model = _lora_model(folder, device)
        trainer = Trainer(model, _examples(4), TrainConfig(batch_tokens=1000))
        loss = trainer.loss_sum(batch.to(device)) / batch.n_targets
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in named])
        results.append((float(loss.detach()), {n: g.cpu() for (n, _), g in zip(named, grads, strict=True)}))
    (loss_cpu, grads_cpu), (loss_dev, grads_dev) = results
    assert loss_dev == pytest.approx(loss_cpu, rel=1e-5)
    assert grads_dev.keys() == grads_cpu.keys()
    for name, g in grads_dev.items():
        error = float((g - grads_cpu[name]).norm() / grads_cpu[name].norm())
        assert error < 1e-4, (name, error)  # relative to the gradient's size, as against PEFT (test_finetune)


def test_training_steps_and_the_saved_adapter_match_the_cpu(tiny_hf, tmp_path) -> None:
    _, folder = tiny_hf("mistral-nowindow")
    config = TrainConfig(lr=5e-3, warmup=2, steps=6, batch_tokens=40, grad_accum=2, seed=7)
    lora = LoraConfig(rank=4, alpha=8)
    runs = []
    for device in ("cpu", DEVICE):
        model = _lora_model(folder, device)
        trainer = Trainer(model, _examples(12, seed=5), config, _examples(3, seed=9))
        runs.append(([h["loss"] for h in trainer.train()], trainer.evaluate()))
        save_adapter(model, tmp_path / f"on-{len(runs)}", lora)
    (cpu_losses, cpu_eval), (dev_losses, dev_eval) = runs
    assert dev_losses == pytest.approx(cpu_losses, rel=1e-4)
    assert dev_eval == pytest.approx(cpu_eval, rel=1e-4)
    tokens = _tokens()
    with torch.no_grad():
        cpu = load_model(folder, lora=tmp_path / "on-1")(tokens)
        dev = load_model(folder, device=DEVICE, lora=tmp_path / "on-2")(tokens.to(DEVICE)).cpu()
    torch.testing.assert_close(dev, cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_qlora_on_a_quantized_base(tiny_hf, use_policy, quantize: str) -> None:
    """A quantized base on the device multiplies its dequantized weights in fp32: the logits of the
    CPU's plain PyTorch path (no kernels, which would round activations). Then training through the
    frozen base lowers the loss."""
    _, folder = tiny_hf("mistral-nowindow")
    tokens = _tokens()
    use_policy(kernels=None)  # the device never uses them; the CPU then multiplies as the device does
    with torch.no_grad():
        dev = load_model(folder, device=DEVICE, quantize=quantize)(tokens.to(DEVICE)).cpu()
        cpu = load_model(folder, quantize=quantize)(tokens)
    torch.testing.assert_close(dev, cpu, rtol=1e-4, atol=1e-4)
    model = prepare_model(folder, LoraConfig(rank=4, alpha=8), quantize, device=DEVICE)
    trainer = Trainer(model, _examples(6), TrainConfig(lr=1e-2, steps=12, batch_tokens=200), _examples(2))
    before = trainer.evaluate()
    trainer.train()
    assert trainer.evaluate() < before


def test_full_training_on_the_device(tiny_hf) -> None:
    _, folder = tiny_hf("llama-tied")
    losses = []
    for device in ("cpu", DEVICE):
        model = prepare_model(folder, lora=None, device=device)
        trainer = Trainer(model, _examples(6), TrainConfig(lr=1e-3, steps=3, batch_tokens=200))
        losses.append([h["loss"] for h in trainer.train()])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_bf16_autocast_training_on_the_device(tiny_hf) -> None:
    _, folder = tiny_hf("mistral-nowindow")
    model = _lora_model(folder, DEVICE)
    trainer = Trainer(model, _examples(4), TrainConfig(batch_tokens=1000, bf16=True))
    batch = make_batch(_examples(4))
    loss16 = float(trainer.loss_sum(batch.to(DEVICE)).detach() / batch.n_targets)
    model32 = _lora_model(folder, "cpu")
    loss32 = float(Trainer(model32, _examples(4), TrainConfig(batch_tokens=1000)).loss_sum(batch).detach() / batch.n_targets)
    assert loss16 == pytest.approx(loss32, rel=3e-2)
