"""GGUF files as people download them, beside llama.cpp's own C++ `llama-bench` on the same files.

For each SmolLM2 file (the embedded Q4_1, and Q4_0, Q8_0, Q4_K_M, Q5_K_M, Q6_K written from it by
`llama-quantize`; see llama_tools.py) and each Mistral 7B-shaped file (random Q4_0 blocks as run.py
writes them, and that file requantized into Q4_K_M by `llama-quantize`) our worker loads it in its
default mode (every tensor in the file's own format) and both systems measure batch-1 decode (64
tokens; 32 on the 7B) and a 512-token prefill, taking turns round by round; medians are reported with
ratios and PASS/MISS against the GGUF issue's targets (>= 1.0x llama-bench for both; loading the 7B
Q4_K_M in <= 1.15x its file size) and the CPU issue's (the 7B files' decode at >= 85% of the limit the
read bandwidth sets, measured by run.py's bandwidth_gbs with the same threads: the best of its reads
against our best decode round, both what the machine does at its best, as other tenants of a VM move
either by a fifth from one minute to the next; the median's share is printed beside it). Also: top-1
agreement and perplexity of the SmolLM2 Q4_K_M file against the same weights dequantized to fp32.

    python benchmarks/gguf_files.py [--rounds 3] [--threads 2] [--files Q4_0,Q4_K_M,7B_Q4_K_M] [--isa avx512,avx2]

With --isa, each of our kernel paths this CPU has (lowered with set_isa, so an AMX Xeon also shows the
AVX-512 and AVX2 paths other users run) gets its own row beside the same llama-bench runs; the targets
hold for the default path. Our AVX2 path is also compared with llama-bench built for AVX2 alone
(llama_tools.py --avx2, built on first use), the CPU issue's target for CPUs without AVX-512.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tramontane import preset  # noqa: E402
from tramontane.cli import demo_model_path  # noqa: E402
from tramontane.kernels import load_kernels  # noqa: E402
from tramontane.loading.gguf import read_gguf_metadata  # noqa: E402

from common import RESULTS, WORK, machine, random_quantized_gguf  # noqa: E402
from llama_tools import llama_bench, requantize, smollm2_files  # noqa: E402

PEERS = {"llama": False, "llama_avx2": True}  # llama-bench builds: native, AVX2 only (llama_bench's avx2)
from run import Worker, bandwidth_gbs, section, weight_bytes  # noqa: E402


def quality(path: Path, n_tokens: int) -> dict[str, float]:
    """Perplexity and top-1 agreement of the file's own formats against its weights in fp32. Tokens go
    through the cache 16 at a time, the rows a batched decode step takes: with the integer kernels
    (activations in two int8 parts per element, blocks of 32) every position; on AMX (unless set_isa
    lowered it) 16 rows of a K-quant or Q8_0 matrix run on the tiles (activations rounded to bf16)."""
    from pydoc_data.topics import topics

    import torch

    from tramontane import KVCache, load_model, load_tokenizer

    ids = load_tokenizer(path).encode("\n\n".join(topics[k] for k in sorted(topics)), bos=False)[: n_tokens + 1]
    tokens = torch.tensor([ids])
    stats: dict[str, Any] = {}
    for label, model in (("fp32", load_model(path, dequantize=True)), ("blocks", load_model(path))):
        cache = KVCache.create(model.args, 1, len(ids), dtype=model.dtype)
        with torch.inference_mode():
            logits = torch.cat([model(tokens[:, s : min(s + 16, n_tokens)], torch.arange(s, min(s + 16, n_tokens))[None],
                                      cache=cache)[0]
                                for s in range(0, n_tokens, 16)])
        nll = torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="sum").item()
        stats[label] = {"perplexity": float(torch.exp(torch.tensor(nll / n_tokens))), "top1": logits.argmax(-1)}
    agree = float((stats["blocks"]["top1"] == stats["fp32"]["top1"]).float().mean())
    return {"ppl_fp32": stats["fp32"]["perplexity"], "ppl_blocks": stats["blocks"]["perplexity"], "top1": agree}


def mistral_7b_files() -> dict[str, Path]:
    """The Mistral 7B shape (SmolLM2's vocabulary and tokenizer) as random Q4_0 blocks, and as Q4_K_M."""
    import dataclasses

    args = dataclasses.replace(preset("mistral-7b-v0.3"), vocab_size=49152)
    tokenizer = read_gguf_metadata(demo_model_path(), "tokenizer.")
    q4_0 = random_quantized_gguf(WORK / "mistral7b-q4_0.gguf", args, tokenizer, "Q4_0")
    return {"7B_Q4_0": q4_0, "7B_Q4_K_M": requantize(q4_0, "Q4_K_M", WORK / "mistral7b-q4_k_m.gguf")}


ALL_FILES = "Q4_1,Q4_0,Q8_0,Q4_K_M,Q5_K_M,Q6_K,7B_Q4_0,7B_Q4_K_M"


def results_name(files: str, out: str | None) -> str:
    """`out`, or gguf_files for the whole set of files, else gguf_files_ and the files run."""
    if out:
        return out
    if sorted(files.split(",")) == sorted(ALL_FILES.split(",")):
        return "gguf_files"
    return "gguf_files_" + "_".join(f.lower() for f in files.split(",") if f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--files", default=ALL_FILES)
    ap.add_argument("--out", default=None, help="results name under benchmarks/results (default: gguf_files for "
                    "every file, else gguf_files_ and the files run, so a partial run never replaces the whole one)")
    ap.add_argument("--isa", default="", help="our kernels' paths to measure, e.g. amx,avx512,avx2 (set_isa): "
                    "those this CPU has, the best first; default: the best alone")
    a = ap.parse_args()
    ext = load_kernels()
    have = ext.isas() if ext is not None else ["portable"]
    best = ext.isa() if ext is not None else "portable"
    isas = [best] + [isa for isa in a.isa.split(",") if isa and isa != best and isa in have]
    skipped = [isa for isa in a.isa.split(",") if isa and isa not in have]
    if skipped:
        print(f"--isa: this CPU has no {', '.join(skipped)} (its paths: {', '.join(have)})")
    info = machine()
    print(f"{info['date']}  {info['cpu']}  {info['cores']} cores  torch {info['torch']}  threads {a.threads}")
    wanted = a.files.split(",")
    files = {k: v for k, v in smollm2_files(demo_model_path()).items() if k in wanted}
    if any(k.startswith("7B_") for k in wanted):
        files |= {k: v for k, v in mistral_7b_files().items() if k in wanted}
    results: dict[str, Any] = {"machine": info, "threads": a.threads, "isas": isas, "files": {}}
    checks: list[tuple[str, bool, str]] = []
    for kind, path in files.items():
        big = kind.startswith("7B_")
        model = f"Mistral 7B shape {kind[3:]}" if big else f"SmolLM2 {kind}"
        section(f"{model} ({path.stat().st_size / 2**20:.0f} MiB)")
        workers = {isa: Worker(f"ours {kind} {isa}", "ours", str(path), "--threads", str(a.threads),
                               *(["--isa", isa] if isa != best else []))
                   for isa in isas}
        peers = [p for p, avx2 in PEERS.items() if not avx2 or "avx2" in isas]
        samples: dict[str, list[float]] = {f"{who} {what}": [] for who in [*isas, *peers] for what in ("tg", "pp")}
        n = 32 if big else 64
        for _ in range(a.rounds):  # each round: every system, decode then prefill
            for isa, worker in workers.items():
                samples[f"{isa} tg"].append(worker.ask(cmd="decode", batch=1, n=n)["tok_s"])
            for peer in peers:
                samples[f"{peer} tg"].append(llama_bench(path, a.threads, 0, n, avx2=PEERS[peer]))
            for isa, worker in workers.items():
                samples[f"{isa} pp"].append(worker.ask(cmd="prefill", n=512)["tok_s"])
            for peer in peers:
                samples[f"{peer} pp"].append(llama_bench(path, a.threads, 512, 0, avx2=PEERS[peer]))
        default = workers[best]
        rss = default.ask(cmd="rss")
        for worker in workers.values():
            worker.close()
        med = {(f"ours {k.split()[-1]}" if k.startswith(f"{best} ") else k): statistics.median(v)
               for k, v in samples.items()}
        med["ours rss_gib"] = (rss["peak_rss"] - rss["base_rss"]) / 2**30
        med["ours load_s"] = default.info["load_s"]
        med["ours load_rss_gib"] = (default.info["load_peak_rss"] - default.info["base_rss"]) / 2**30
        results["files"][kind] = med
        for what, label in (("tg", "decode b1"), ("pp", "prefill 512")):
            for isa in isas:
                ours = med[f"ours {what}" if isa == best else f"{isa} {what}"]
                r = ours / med[f"llama {what}"]
                print(f"{label:<12} ours ({isa:<8}) {ours:8.1f}  llama-bench (native) {med[f'llama {what}']:8.1f} tok/s  "
                      f"{r:.2f}x")
                if isa == best:  # the targets hold for the default path; the others are shown
                    checks.append((f"{model} {label} >= 1.0x llama-bench", r >= 1, f"{r:.2f}x"))
                if isa == "avx2" and "llama_avx2" in peers:  # against the peer built for the same instructions
                    r = ours / med[f"llama_avx2 {what}"]
                    print(f"{label:<12} ours ({isa:<8}) {ours:8.1f}  llama-bench (AVX2) {med[f'llama_avx2 {what}']:10.1f} "
                          f"tok/s  {r:.2f}x")
                    checks.append((f"{model} {label}, AVX2 paths, >= 1.0x llama-bench built for AVX2", r >= 1,
                                   f"{r:.2f}x"))
        size = path.stat().st_size / 2**30
        print(f"ours: load {med['ours load_s']:.2f} s, peak RSS loading {med['ours load_rss_gib']:.2f} GiB "
              f"({med['ours load_rss_gib'] / size:.2f}x the file), after the runs {med['ours rss_gib']:.2f} GiB", flush=True)
        if big:  # how close decode comes to what the memory allows: every weight read once a token
            import torch

            torch.set_num_threads(a.threads)
            gbs = bandwidth_gbs()
            limit = gbs * 1e9 / weight_bytes(path, None)
            med["bandwidth_gbs"], med["bandwidth_limit_tok_s"] = gbs, limit
            med["ours tg_best"] = max(samples[f"{best} tg"])
            frac = med["ours tg_best"] / limit
            print(f"read bandwidth {gbs:.1f} GB/s ({a.threads} threads) allows {limit:.2f} tok/s: ours {frac:.0%} at "
                  f"best ({med['ours tg'] / limit:.0%} median), llama-bench {med['llama tg'] / limit:.0%} median",
                  flush=True)
            checks.append((f"{model} decode b1 >= 85% of the read bandwidth limit", frac >= 0.85,
                           f"{frac:.0%} of {limit:.2f} tok/s ({gbs:.1f} GB/s)"))
        if kind == "7B_Q4_K_M":
            r = med["ours load_rss_gib"] / size
            checks.append((f"{model}: peak RSS loading <= 1.15x the file", r <= 1.15, f"{r:.2f}x"))
    if "Q4_K_M" in files:
        # every product path this CPU has for 16 rows: AMX tiles where it has them, the integer kernels always
        ext = load_kernels()
        paths = [p for p in ("amx", "avx512", "avx_vnni", "avx2") if ext is not None and p in ext.isas()][:2]
        for isa in paths:
            section(f"quality: SmolLM2 Q4_K_M in its formats against the same weights in fp32, 4096 tokens, {isa}")
            best = ext.isa()
            ext.set_isa(isa)
            try:
                q = quality(files["Q4_K_M"], 4096)
            finally:
                ext.set_isa(best)
            results[f"quality_q4_k_m_{isa}"] = q
            d = q["ppl_blocks"] / q["ppl_fp32"] - 1
            print(f"perplexity fp32 {q['ppl_fp32']:.3f}, formats kept {q['ppl_blocks']:.3f} ({d:+.2%}); top-1 {q['top1']:.1%}")
            checks.append((f"Q4_K_M top-1 agreement >= 99% ({isa})", q["top1"] >= 0.99, f"{q['top1']:.1%}"))
            checks.append((f"Q4_K_M perplexity within 0.5% of fp32 ({isa})", abs(d) <= 0.005, f"{d:+.2%}"))
    section("targets")
    for label, ok, value in checks:
        print(f"{'PASS' if ok else 'MISS'}  {label}: {value}")
    results["targets"] = [{"target": t, "pass": ok, "value": v} for t, ok, v in checks]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{results_name(a.files, a.out)}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
