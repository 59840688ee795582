"""A real run: LoRA on SmolLM2-135M learns invented facts (eval loss drops, greedy answers state them),
and the `tramontane finetune` command works end to end. The bigger version is benchmarks/finetune.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from finetune_facts import KEYS, questions, write_facts

from tramontane import chat, load_tokenizer
from tramontane.finetune import TrainConfig, Trainer, load_examples, prepare_model
from tramontane.lora import LoraConfig

from console import tramontane


@pytest.mark.slow
def test_lora_learns_invented_facts(smollm2_gguf_path: Path, tmp_path: Path) -> None:
    train, evals = write_facts(tmp_path, repeats=1)  # 18 chats; 6 held-out phrasings to evaluate
    tokenizer = load_tokenizer(smollm2_gguf_path)
    model = prepare_model(smollm2_gguf_path, LoraConfig(rank=16, alpha=32))
    config = TrainConfig(lr=2e-3, steps=12, warmup=2, batch_tokens=384, seed=0)
    trainer = Trainer(model, load_examples(train, tokenizer, 385), config, load_examples(evals, tokenizer))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.history[-1]["eval"]
    assert after < 0.3 * before, (before, after)
    answers = chat(model.eval(), tokenizer, questions(), max_tokens=20, temperature=0)
    stated = [key in a.text for key, a in zip(KEYS, answers, strict=True)]
    assert sum(stated) >= 4, [a.text for a in answers]


@pytest.mark.slow
def test_cli_check_data(smollm2_gguf_path: Path, tmp_path: Path) -> None:
    train, _ = write_facts(tmp_path, repeats=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(train.read_text() + '{"messages": [{"role": "user", "content": "x"}]}\n')
    r = tramontane("finetune", "--model", str(smollm2_gguf_path), "--data", str(bad), "--check-data")
    assert r.returncode == 1 and "19 records, 18 usable, 1 problems" in r.stdout
    assert f"{bad}:19: messages: no assistant message" in r.stdout
    r = tramontane("finetune", "--model", str(smollm2_gguf_path), "--data", str(train), "--check-data")
    assert r.returncode == 0 and "18 records, 18 usable, 0 problems" in r.stdout


@pytest.mark.slow
def test_cli_short_run_writes_adapter_and_checkpoints(smollm2_gguf_path: Path, tmp_path: Path) -> None:
    train, evals = write_facts(tmp_path, repeats=1)
    r = tramontane("finetune", "--model", str(smollm2_gguf_path), "--data", str(train), "--eval", str(evals),
                   "--out", str(tmp_path / "out"), "--steps", "2", "--batch-tokens", "96", "--targets", "wq,wv",
                   "--lora-rank", "4", "--save-every", "1", "--format", "mistral", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "2 steps" in r.stdout and (tmp_path / "out" / "lora.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoint-2" / "trainer_state.pt").is_file()
