"""The training loop: AdamW over the trainable weights (LoRA adapters, or all with `--full`), packed
batches, gradient accumulation, warmup + cosine schedule, evaluation and resumable checkpoints.

The loss of an optimizer step is the mean cross-entropy over every scored target of its `grad_accum`
batches (each batch's sum divided by the step's total count), so packing, batch sizes and accumulation
change the arithmetic, never the objective.

Example:
    >>> model = apply_lora(load_model(path, dequantize=True), LoraConfig(rank=16))
    >>> trainer = Trainer(model, load_examples("train.jsonl", tok, 2049), TrainConfig(steps=100))
    >>> trainer.train(progress=True)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..model import Transformer
from .data import Example
from .loss import scored_loss
from .packing import IGNORE, Batch, epoch_plan, make_batch
from .schedule import warmup_cosine

STATE_FILE = "trainer_state.pt"
# fields a resumed run must share with the run that saved the checkpoint (or the data order differs)
SAME_ON_RESUME = ("batch_tokens", "grad_accum", "seed", "shuffle")


@dataclass(frozen=True)
class TrainConfig:
    """How to train. `steps` (optimizer steps) wins over `epochs`; without it the run goes through the
    data exactly `epochs` times (each epoch's own packing decides its batches), in steps of `grad_accum`
    batches, the last step taking what is left. `warmup` steps ramp the learning rate
    up linearly, then it decays along a cosine to 0. `eval_every`/`save_every` 0 means: at the end
    only / never."""

    lr: float = 1e-4
    warmup: int = 0
    steps: int | None = None
    epochs: int = 1
    batch_tokens: int = 2048
    grad_accum: int = 1
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int = 0
    save_every: int = 0
    bf16: bool = False  # bf16 autocast of the matmuls (where the device has bf16 arithmetic)
    # keep one block's activations at a time and recompute them in the backward pass (Transformer.features)
    gradient_checkpointing: bool = False
    shuffle: bool = True

    def __post_init__(self) -> None:
        checks = {"lr": self.lr > 0, "warmup": self.warmup >= 0, "epochs": self.epochs >= 1,
                  "batch_tokens": self.batch_tokens >= 1, "grad_accum": self.grad_accum >= 1,
                  "weight_decay": self.weight_decay >= 0, "eval_every": self.eval_every >= 0,
                  "save_every": self.save_every >= 0,
                  "steps": self.steps is None or self.steps >= 1,
                  "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}")


class Trainer:
    """Trains the parameters of `model` that require grad on `examples`.

    State (step, data position, optimizer, schedule, RNG) lives here and goes whole into checkpoints,
    so `resume` continues exactly where `save_checkpoint` stopped.
    """

    def __init__(self, model: Transformer, examples: Sequence[Example], config: TrainConfig,
                 eval_examples: Sequence[Example] | None = None) -> None:
        self.model, self.examples, self.config = model, list(examples), config
        self.eval_examples = list(eval_examples or [])
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError("the model has no trainable parameters: apply_lora first, or unfreeze for full training")
        if not self.examples:
            raise ValueError("examples: no training examples")
        torch.manual_seed(config.seed)  # dropout draws from the global generator, saved in checkpoints
        self.optimizer = torch.optim.AdamW([p for _, p in self.named], lr=config.lr,
                                           weight_decay=config.weight_decay)
        # with `epochs`: every batch of those epochs, once (None: `steps` decides, the data turning over)
        self.batches = None if config.steps else [len(self._plan(e)) for e in range(config.epochs)]
        self.total = config.steps or -(-sum(self.batches or [1]) // config.grad_accum)
        self.scheduler = warmup_cosine(self.optimizer, min(config.warmup, self.total - 1), self.total)
        self.step, self.epoch, self.cursor = 0, 0, 0
        self.history: list[dict[str, float]] = []  # one entry per step: step, loss, lr, tokens, [eval]
        self._plans: dict[int, list[list[int]]] = {}

    def _plan(self, epoch: int) -> list[list[int]]:
        return epoch_plan(self.examples, self.config.batch_tokens, self.config.seed, epoch, self.config.shuffle)

    def _next_batch(self) -> Batch:
        """The next batch of the data stream (epochs follow each other without end)."""
        plan = self._plans.get(self.epoch) or self._plans.setdefault(self.epoch, self._plan(self.epoch))
        if self.cursor >= len(plan):
            self._plans.pop(self.epoch, None)
            self.epoch, self.cursor = self.epoch + 1, 0
            return self._next_batch()
        self.cursor += 1
        return make_batch([self.examples[i] for i in plan[self.cursor - 1]]).to(self.model.device)

    def _autocast(self) -> AbstractContextManager[Any]:
        if not self.config.bf16:
            return nullcontext()
        return torch.autocast(self.model.device.type, dtype=torch.bfloat16)

    def loss_sum(self, batch: Batch) -> torch.Tensor:
        """Summed cross-entropy over the scored targets of `batch`; logits only where a target is."""
        with self._autocast():
            h = self.model.features(batch.tokens, batch.positions, segments=batch.segments,
                                    recompute=self.config.gradient_checkpointing)  # [1, T, dim]
            scored = batch.targets.view(-1) != IGNORE
            return scored_loss(self.model, h.view(-1, h.shape[-1])[scored], batch.targets.view(-1)[scored])

    def train_step(self) -> float:
        """One optimizer step over `grad_accum` batches; returns its mean loss per scored target."""
        self.model.train()
        n = self.config.grad_accum
        if self.batches is not None:  # the last step of the last epoch takes what is left
            n = min(n, sum(self.batches) - sum(self.batches[: self.epoch]) - self.cursor)
        batches = [self._next_batch() for _ in range(n)]
        count = sum(b.n_targets for b in batches)
        total = 0.0
        for batch in batches:
            if batch.n_targets == 0:
                continue
            loss = self.loss_sum(batch) / count
            loss.backward()
            total += float(loss.detach())
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.named], self.config.max_grad_norm)
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.history.append({"step": self.step, "loss": total, "lr": lr,
                             "tokens": float(sum(b.tokens.numel() for b in batches))})
        return total

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per scored target over the eval examples (packed in order, no dropout)."""
        if not self.eval_examples:
            raise ValueError("evaluate: no eval examples were given")
        self.model.eval()
        plan = epoch_plan(self.eval_examples, self.config.batch_tokens, 0, 0, shuffle=False)
        loss, count = 0.0, 0
        for group in plan:
            batch = make_batch([self.eval_examples[i] for i in group]).to(self.model.device)
            if batch.n_targets:
                loss += float(self.loss_sum(batch))
                count += batch.n_targets
        return loss / max(count, 1)

    def train(self, progress: bool = False, checkpoints: Path | None = None) -> list[dict[str, float]]:
        """Run to `self.total` steps (from wherever the trainer stands); evaluate every `eval_every`
        steps and at the end (with eval examples); save a checkpoint under `checkpoints` every
        `save_every` steps. Returns the history."""
        bar = tqdm(total=self.total, initial=self.step, disable=not progress, unit="step", dynamic_ncols=True)
        shown: dict[str, str] = {}
        try:
            while self.step < self.total:
                start = time.perf_counter()
                loss = self.train_step()
                seconds = time.perf_counter() - start
                shown.update(loss=f"{loss:.4f}", tok_s=f"{self.history[-1]['tokens'] / seconds:.0f}")
                every = self.config.eval_every
                if self.eval_examples and ((every and self.step % every == 0) or self.step == self.total):
                    self.history[-1]["eval"] = self.evaluate()
                    shown["eval"] = f"{self.history[-1]['eval']:.4f}"
                if checkpoints is not None and self.config.save_every and self.step % self.config.save_every == 0:
                    self.save_checkpoint(checkpoints / f"checkpoint-{self.step}")
                bar.set_postfix(shown, refresh=False)
                bar.update(1)
        finally:
            bar.close()
        return self.history

    # -------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, folder: Path) -> Path:
        """Everything `resume` needs, in `folder/trainer_state.pt`: trainable weights, optimizer,
        schedule, RNG, data position and history."""
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step, "epoch": self.epoch, "cursor": self.cursor, "total": self.total,
            "config": asdict(self.config), "history": self.history,
            "trainable": {n: p.detach().clone() for n, p in self.named},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        }
        torch.save(state, folder / STATE_FILE)
        return folder

    def resume(self, folder: Path) -> None:
        """Continue from a checkpoint of `save_checkpoint`.

        Raises:
            ValueError: the checkpoint is missing, was made with another data order (batch_tokens,
                grad_accum, seed, shuffle) or other trainable weights.
        """
        file = checkpoint_file(folder)
        state = torch.load(file, weights_only=True)
        for name in SAME_ON_RESUME:
            if state["config"][name] != getattr(self.config, name):
                raise ValueError(f"{file}: {name} was {state['config'][name]!r} in the checkpointed run, "
                                 f"now {getattr(self.config, name)!r}; a resumed run must keep it")
        saved = state["trainable"]
        if set(saved) != {n for n, _ in self.named}:
            raise ValueError(f"{file}: holds other trainable weights than this model (LoRA targets or rank differ)")
        with torch.no_grad():
            for name, p in self.named:
                if saved[name].shape != p.shape:
                    raise ValueError(f"{file}: {name} has shape {tuple(saved[name].shape)}, the model {tuple(p.shape)}")
                p.copy_(saved[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step, self.epoch, self.cursor = state["step"], state["epoch"], state["cursor"]
        self.total = self.config.steps or state["total"]
        self.history = list(state["history"])
        self._plans.clear()


def checkpoint_file(folder: Path) -> Path:
    """The state file of a checkpoint folder, or of the latest `checkpoint-N` inside a run's folder.

    Raises:
        ValueError: there is none.
    """
    if (folder / STATE_FILE).is_file():
        return folder / STATE_FILE
    found = sorted(folder.glob(f"checkpoint-*/{STATE_FILE}"), key=lambda p: int(p.parent.name.split("-")[-1]))
    if not found:
        raise ValueError(f"resume: {folder} holds no {STATE_FILE} and no checkpoint-N folder with one")
    return found[-1]
