"""`make bench`: tramontane beside llama.cpp (its own C++ llama-bench) and transformers, in one process tree.

Every system runs in its own worker process (so load time and peak RSS are its own) and the timing
commands go round-robin, several rounds, so that the systems are measured interleaved under the same
machine conditions; the median of the rounds is reported. Ratios, the memory-bandwidth limit and
PASS/MISS for each target of the speed issue are printed; JSON and a PNG chart go to benchmarks/results/.

Usage: python benchmarks/run.py [--quick] [--sections smollm2,1b,7b,quality] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tramontane import ModelArgs, load_model  # noqa: E402
from tramontane.cli import demo_model_path  # noqa: E402
from tramontane.fuse import unfused_state_dict  # noqa: E402
from tramontane.loading import hf, native  # noqa: E402
from tramontane.loading.gguf import read_gguf_metadata  # noqa: E402
from tramontane.loading.gguf_write import write_gguf  # noqa: E402

from common import MISTRAL_1B, RESULTS, WORK, machine, random_quantized_gguf, random_state_dict  # noqa: E402


class Worker:
    def __init__(self, label: str, *argv: str) -> None:
        self.label = label
        self.proc = subprocess.Popen([sys.executable, str(HERE / "workers.py"), *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} died (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def bandwidth_gbs() -> float:
    """Read bandwidth: summing a 2 GiB tensor (far larger than any cache) with every thread."""
    x = torch.ones(512 * 2**20, dtype=torch.float32)
    x.sum()
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = max(best, x.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def measure(workers: list[Worker], cmd: dict[str, Any], rounds: int) -> dict[str, float | None]:
    """Median over `rounds` of `cmd`, the workers taking turns within each round."""
    samples: dict[str, list[float]] = {w.label: [] for w in workers}
    errors: dict[str, str] = {}
    for _ in range(rounds):
        for w in workers:
            out = w.ask(**cmd)
            if "error" in out:
                errors[w.label] = out["error"]
            else:
                samples[w.label].append(out["tok_s"])
    return {k: (statistics.median(v) if v else None) for k, v in samples.items()}


def weight_bytes(path: Path, quantize: str | None) -> int:
    """Bytes a decode step reads: every weight once, but of an untied embedding table only the rows of
    the batch's tokens (nothing, to this precision); a tied table is read whole, as the output head."""
    from tramontane.quantize import quantized_state_dict

    model = load_model(path, quantize=quantize)
    untied = not model.args.tied_embeddings
    return sum(t.numel() * t.element_size() for name, t in quantized_state_dict(model).items()
               if not (untied and name.startswith("tok_embeddings.")))


def gguf_with(src_state: dict[str, torch.Tensor], args: ModelArgs, qtype: str, tokenizer_from: Path, out: Path) -> Path:
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(out, args, src_state, tokenizer=read_gguf_metadata(tokenizer_from, "tokenizer."), qtype=qtype)
    return out


def quantized_folder(src: Path, method: str, name: str) -> Path:
    """`tramontane quantize` once: the workers load the saved folder, as a deployment would."""
    from tramontane.loading import save_model

    out = WORK / f"{name}-{method}"
    if not (out / "params.json").is_file():
        save_model(load_model(src, quantize=method), out, to="native")
    return out


# ------------------------------------------------------------------------------------------ sections
def section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def compare_systems(name: str, specs: list[tuple[str, list[str]]], n: int, rounds: int, batch8: list[str],
                    results: dict[str, Any], prefill: bool = True) -> dict[str, Any]:
    workers = []
    for label, argv in specs:
        print(f"loading {label} ...", flush=True)
        workers.append(Worker(label, *argv))
    out: dict[str, Any] = {"load_s": {w.label: w.info["load_s"] for w in workers}}
    out["decode_b1"] = measure(workers, {"cmd": "decode", "batch": 1, "n": n}, rounds)
    b8 = [w for w in workers if w.label in batch8]
    out["decode_b8"] = measure(b8, {"cmd": "decode", "batch": 8, "n": max(n // 2, 8)}, rounds)
    out["prefill_512"] = measure(workers, {"cmd": "prefill", "n": 512}, max(1, rounds - 1)) if prefill else {}
    out["peak_rss_gib"] = {}
    for w in workers:
        r = w.ask(cmd="rss")
        out["peak_rss_gib"][w.label] = (r["peak_rss"] - r["base_rss"]) / 2**30
        w.close()
    results[name] = out
    print(f"{'system':<16} {'load s':>7} {'decode b1':>10} {'decode b8':>10} {'prefill512':>11} {'RSS GiB':>8}")
    for w in workers:
        lab = w.label
        fmt = lambda v: f"{v:10.1f}" if isinstance(v, float) else f"{'-':>10}"  # noqa: E731
        print(f"{lab:<16} {out['load_s'][lab]:7.1f} {fmt(out['decode_b1'][lab])} {fmt(out['decode_b8'].get(lab))} "
              f" {fmt(out['prefill_512'].get(lab))} {out['peak_rss_gib'][lab]:8.2f}")
    return out


def smollm2(rounds: int, n: int, threads: int, results: dict[str, Any], gbs: float) -> list[tuple[str, bool | None, str]]:
    section("SmolLM2-135M-Instruct (real weights)")
    gguf = demo_model_path()
    model = load_model(gguf, dequantize=True)
    state, args = unfused_state_dict(model.state_dict(), model), model.args
    del model
    q8 = gguf_with(state, args, "Q8_0", gguf, WORK / "smollm2-q8_0.gguf")
    q40 = gguf_with(state, args, "Q4_0", gguf, WORK / "smollm2-q4_0.gguf")
    t = ["--threads", str(threads)]
    specs = [
        ("ours fp32", ["ours", str(gguf), "--dequantize", *t]),
        ("ours int8", ["ours", str(quantized_folder(gguf, "int8", "smollm2")), *t]),
        ("ours int4", ["ours", str(quantized_folder(gguf, "int4", "smollm2")), *t]),
        ("ours int4_asym", ["ours", str(gguf), *t]),  # the Q4_1 file as it is (its Q8_0 embedding too)
        ("llama Q8_0", ["llama", str(q8), *t]),
        ("llama Q4_1", ["llama", str(gguf), *t]),
        ("llama Q4_0", ["llama", str(q40), *t]),
        ("hf fp32", ["hf", str(gguf), "--gguf", *t]),
    ]
    out = compare_systems("smollm2", specs, n, rounds, ["ours fp32", "ours int8", "ours int4", "hf fp32"], results)
    d = out["decode_b1"]
    checks = []
    for ours, peer in (("int4", "Q4_0"), ("int4_asym", "Q4_1")):
        r = (d[f"ours {ours}"] or 0) / (d[f"llama {peer}"] or 1)
        checks.append((f"SmolLM2 b1: {ours} >= 1.0x llama.cpp {peer}", r >= 1, f"{r:.2f}x"))
    checks.append(("SmolLM2 b1: int8 >= 1.0x llama.cpp Q8_0", (d["ours int8"] or 0) >= (d["llama Q8_0"] or 1),
                   f"{(d['ours int8'] or 0) / (d['llama Q8_0'] or 1):.2f}x"))
    best = max(v for k, v in d.items() if k.startswith("ours") and v)
    checks.append(("SmolLM2 b1: best mode >= 4x transformers fp32", best >= 4 * (d["hf fp32"] or 1e9),
                   f"{best / (d['hf fp32'] or 1):.2f}x"))
    p = out["prefill_512"]
    checks.append(("SmolLM2 prefill 512: int4 >= 1.0x llama.cpp Q4_0", (p["ours int4"] or 0) >= (p["llama Q4_0"] or 1),
                   f"{(p['ours int4'] or 0) / (p['llama Q4_0'] or 1):.2f}x"))
    return checks


def mistral_1b(rounds: int, n: int, threads: int, results: dict[str, Any], gbs: float) -> list[tuple[str, bool | None, str]]:
    section("random Mistral-shaped ~1B (vocab 49152, SmolLM2's tokenizer for llama.cpp)")
    import dataclasses

    args = dataclasses.replace(MISTRAL_1B, vocab_size=49152)
    folder = WORK / "mistral1b-native"
    hf_folder = WORK / "mistral1b-hf"
    if not (folder / "params.json").is_file() or not (hf_folder / "config.json").is_file():
        state = random_state_dict(args, torch.float32)
        native.save(folder, args, state)
        hf.save(hf_folder, args, state)
        del state
    model = load_model(folder)
    state = unfused_state_dict(model.state_dict(), model)
    del model
    ggufs = {q: gguf_with(state, args, q, demo_model_path(), WORK / f"mistral1b-{q.lower()}.gguf")
             for q in ("F32", "Q8_0", "Q4_0")}
    del state
    t = ["--threads", str(threads)]
    specs = [
        ("ours fp32", ["ours", str(folder), *t]),
        ("ours int8", ["ours", str(quantized_folder(folder, "int8", "mistral1b")), *t]),
        ("ours int4", ["ours", str(quantized_folder(folder, "int4", "mistral1b")), *t]),
        ("llama F32", ["llama", str(ggufs["F32"]), *t]),
        ("llama Q8_0", ["llama", str(ggufs["Q8_0"]), *t]),
        ("llama Q4_0", ["llama", str(ggufs["Q4_0"]), *t]),
        ("hf fp32", ["hf", str(hf_folder), *t]),
    ]
    out = compare_systems("mistral_1b", specs, n, rounds, ["ours fp32", "ours int8", "ours int4", "hf fp32"],
                          results)
    d, b8 = out["decode_b1"], out["decode_b8"]
    checks = []
    limits = {}
    for mode, q in (("fp32", None), ("int8", "int8"), ("int4", "int4")):
        limit = gbs * 1e9 / weight_bytes(folder, q)
        limits[mode] = limit
        frac = (d[f"ours {mode}"] or 0) / limit
        checks.append((f"1B b1 {mode}: >= 80% of bandwidth limit", frac >= 0.8, f"{frac:.0%} of {limit:.1f} tok/s"))
    out["bandwidth_limit_tok_s"], out["bandwidth_gbs"] = limits, gbs
    checks.append(("1B b1: int8 >= 1.0x llama.cpp Q8_0", (d["ours int8"] or 0) >= (d["llama Q8_0"] or 1),
                   f"{(d['ours int8'] or 0) / (d['llama Q8_0'] or 1):.2f}x"))
    checks.append(("1B b1: int4 >= 1.0x llama.cpp Q4_0", (d["ours int4"] or 0) >= (d["llama Q4_0"] or 1),
                   f"{(d['ours int4'] or 0) / (d['llama Q4_0'] or 1):.2f}x"))
    for mode in ("fp32", "int8", "int4"):
        r = (b8[f"ours {mode}"] or 0) / (d[f"ours {mode}"] or 1)
        checks.append((f"1B {mode}: batch 8 aggregate >= 4x batch 1", r >= 4, f"{r:.2f}x"))
    p = out["prefill_512"]
    for mode, peer in (("fp32", "llama F32"), ("int8", "llama Q8_0"), ("int4", "llama Q4_0")):
        r = (p[f"ours {mode}"] or 0) / (p[peer] or 1)
        checks.append((f"1B prefill 512 {mode}: >= 1.0x {peer}", r >= 1, f"{r:.2f}x"))
    return checks


def mistral_7b(rounds: int, n: int, threads: int, results: dict[str, Any], gbs: float) -> list[tuple[str, bool | None, str]]:
    section("Mistral 7B shape, int4: one random Q4_0 GGUF read by both (vocab 49152, SmolLM2's tokenizer)")
    import dataclasses

    from gguf import GGUFReader

    from tramontane import preset

    args = dataclasses.replace(preset("mistral-7b-v0.3"), vocab_size=49152)
    tokenizer = read_gguf_metadata(demo_model_path(), "tokenizer.")
    path = random_quantized_gguf(WORK / "mistral7b-q4_0.gguf", args, tokenizer, "Q4_0")
    t = ["--threads", str(threads)]
    specs = [("ours int4", ["ours", str(path), "--quantize", "int4", *t]), ("llama Q4_0", ["llama", str(path), *t])]
    out = compare_systems("mistral_7b", specs, n, rounds, [], results, prefill=False)
    tensors = GGUFReader(path).tensors
    weights = sum(int(x.n_bytes) for x in tensors)  # resident
    read = sum(int(x.n_bytes) for x in tensors if x.name != "token_embd.weight")  # per token (untied)
    # the decode runs hold one sequence of 16 + n + 1 positions: keys and values of every layer, fp32
    cache = 2 * args.n_layers * args.n_kv_heads * args.head_dim * (16 + n + 1) * 4
    limit = gbs * 1e9 / read
    out["weights_gib"], out["bandwidth_limit_tok_s"], out["bandwidth_gbs"] = weights / 2**30, limit, gbs
    d = out["decode_b1"]
    rss = out["peak_rss_gib"]["ours int4"] * 2**30
    print(f"Q4_0 weights {weights / 2**30:.2f} GiB, bandwidth limit {limit:.1f} tok/s")
    checks: list[tuple[str, bool | None, str]] = [
        ("7B b1: int4 >= 1.0x llama.cpp Q4_0", (d["ours int4"] or 0) >= (d["llama Q4_0"] or 1),
         f"{(d['ours int4'] or 0) / (d['llama Q4_0'] or 1):.2f}x"),
        ("7B int4: peak RSS <= 1.2x quantized weights + cache", rss <= 1.2 * (weights + cache),
         f"{rss / (weights + cache):.2f}x"),
        ("7B b1 int4: fraction of bandwidth limit", None, f"{(d['ours int4'] or 0) / limit:.0%} of {limit:.1f} tok/s"),
    ]

    # int8 (no target in the issue; measured for the table): llama.cpp reads Q8_0 blocks, we quantize the
    # same file per output channel at load
    section("Mistral 7B shape, int8: one random Q8_0 GGUF; ours re-quantized per channel at load")
    path = random_quantized_gguf(WORK / "mistral7b-q8_0.gguf", args, tokenizer, "Q8_0")
    specs = [("ours int8", ["ours", str(path), "--quantize", "int8", *t]), ("llama Q8_0", ["llama", str(path), *t])]
    out = compare_systems("mistral_7b_int8", specs, n, rounds, [], results, prefill=False)
    # ours: one byte per weight and an fp32 scale per row; the embedding table is read a row at a time
    ours = {x.name: int(x.n_elements) + 4 * int(x.shape[-1]) for x in GGUFReader(path).tensors if len(x.shape) == 2}
    weights8, read8 = sum(ours.values()), sum(v for k, v in ours.items() if k != "token_embd.weight")
    limit8 = gbs * 1e9 / read8
    out["weights_gib"], out["bandwidth_limit_tok_s"], out["bandwidth_gbs"] = weights8 / 2**30, limit8, gbs
    d = out["decode_b1"]
    rss = out["peak_rss_gib"]["ours int8"] * 2**30
    print(f"our int8 weights {weights8 / 2**30:.2f} GiB, bandwidth limit {limit8:.1f} tok/s")
    checks += [
        ("7B b1: int8 vs llama.cpp Q8_0", None, f"{(d['ours int8'] or 0) / (d['llama Q8_0'] or 1):.2f}x"),
        ("7B int8: peak RSS / (int8 weights + cache)", None, f"{rss / (weights8 + cache):.2f}x"),
        ("7B b1 int8: fraction of bandwidth limit", None, f"{(d['ours int8'] or 0) / limit8:.0%} of {limit8:.1f} tok/s"),
    ]
    return checks


def quality(results: dict[str, Any], n_tokens: int) -> list[tuple[str, bool | None, str]]:
    """Perplexity and top-1 agreement with fp32, on real English text (Python's own documentation)."""
    section(f"quality on SmolLM2: {n_tokens} tokens of the Python docs (pydoc_data)")
    from pydoc_data.topics import topics

    from tramontane import load_tokenizer

    path = demo_model_path()
    tok = load_tokenizer(path)
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok.encode(text, bos=False)[: n_tokens + 1]
    window = 1024
    stats: dict[str, Any] = {}
    ref_top1: list[torch.Tensor] = []
    for mode in (None, "int8", "int4", "int4_asym"):
        model = load_model(path, quantize=mode, dequantize=mode is None)
        nll, top1 = 0.0, []
        with torch.inference_mode():
            for s in range(0, len(ids) - 1, window):
                chunk = torch.tensor([ids[s : s + window + 1]])
                logits = model(chunk[:, :-1])[0]
                nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
                top1.append(logits.argmax(-1))
        label = mode or "fp32"
        ppl = float(torch.exp(torch.tensor(nll / (len(ids) - 1))))
        agree = 1.0 if mode is None else float((torch.cat(top1) == torch.cat(ref_top1)).float().mean())
        if mode is None:
            ref_top1 = top1
        stats[label] = {"perplexity": ppl, "top1_agreement": agree}
        print(f"{label:<9} perplexity {ppl:8.3f}  top-1 agreement with fp32 {agree:6.1%}", flush=True)
    results["quality"] = stats
    base = stats["fp32"]["perplexity"]
    d8 = stats["int8"]["perplexity"] / base - 1
    d4 = stats["int4"]["perplexity"] / base - 1
    d4a = stats["int4_asym"]["perplexity"] / base - 1
    print(f"perplexity change: int8 {d8:+.2%}, int4 {d4:+.2%}, int4_asym {d4a:+.2%}")
    print("(fp32 is the model file's Q4_1 blocks dequantized: int4_asym keeps them exactly, int4 rounds them "
          "again onto Q4_0's symmetric grid)")
    return [("quality: int8 perplexity within 1% of fp32", abs(d8) <= 0.01, f"{d8:+.2%}")]


def chart(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no chart)")
        return
    names = [k for k in ("smollm2", "mistral_1b", "mistral_7b", "mistral_7b_int8") if k in results]
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        d = {k: v for k, v in results[name]["decode_b1"].items() if v}
        ax.barh(list(d), list(d.values()), color=["#1f77b4" if k.startswith("ours") else "#999999" for k in d])
        ax.set_title(f"{name}: batch-1 decode, tokens/s")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"chart: {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer tokens and rounds: a smoke run")
    ap.add_argument("--sections", default="smollm2,1b,7b,quality")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sections = set(a.sections.split(","))
    n = 16 if a.quick else 64
    rounds = 1 if a.quick else a.rounds
    info = machine()
    gbs = bandwidth_gbs()
    print(f"{info['date']}  {info['cpu']}  {info['cores']} cores  torch {info['torch']}  threads {a.threads}")
    print(f"memory read bandwidth: {gbs:.1f} GB/s (2 GiB sum, best of 5)")
    results: dict[str, Any] = {"machine": info, "bandwidth_gbs": gbs, "threads": a.threads}
    checks: list[tuple[str, bool | None, str]] = []
    if "smollm2" in sections:
        checks += smollm2(rounds, n, a.threads, results, gbs)
    if "1b" in sections:
        checks += mistral_1b(rounds, n // 2, a.threads, results, gbs)
    if "7b" in sections:
        checks += mistral_7b(max(1, rounds - 1), 16, a.threads, results, gbs)
    if "quality" in sections:
        checks += quality(results, 512 if a.quick else 4096)
    section("targets")
    for label, ok, value in checks:
        print(f"{'info' if ok is None else 'PASS' if ok else 'MISS'}  {label}: {value}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench.json"
    # sections run separately accumulate in one file; targets are keyed by their label
    merged = json.loads(out.read_text()) if out.is_file() else {}
    targets = {t["target"]: t for t in merged.get("targets", [])}
    targets.update({t: {"target": t, "pass": ok, "value": v, "date": info["date"]} for t, ok, v in checks})
    merged.update(results)
    merged["targets"] = list(targets.values())
    results = merged
    out.write_text(json.dumps(results, indent=2) + "\n")
    chart(results, RESULTS / "bench.png")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
