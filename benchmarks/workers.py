"""A benchmark worker: loads one system (tramontane, llama.cpp's llama-bench or transformers) once, then answers timing
commands on stdin with JSON lines on stdout, so that the orchestrator can interleave the systems.

    python benchmarks/workers.py ours  PATH [--quantize int8|int4] [--dequantize] [--isa avx2]
    python benchmarks/workers.py llama PATH.gguf
    python benchmarks/workers.py hf    PATH [--gguf]

Commands: {"cmd": "decode", "batch": B, "n": N}, {"cmd": "prefill", "n": N}, {"cmd": "rss"}, {"cmd": "quit"}.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, min(vocab, 30000)) for _ in range(length)] for _ in range(batch)]


class Ours:
    def __init__(self, path: str, quantize: str | None, dequantize: bool) -> None:
        import torch

        import tramontane

        self.torch = torch
        self.tramontane = tramontane
        self.model = tramontane.load_model(path, quantize=quantize, dequantize=dequantize)
        self.vocab = self.model.args.vocab_size

    def decode(self, batch: int, n: int) -> float:
        ps = prompts(batch, 16, self.vocab)
        gen = self.tramontane.generate
        gen(self.model, ps, max_tokens=3)  # warm-up
        t0 = time.perf_counter()
        gen(self.model, ps, max_tokens=1)
        t1 = time.perf_counter()
        gen(self.model, ps, max_tokens=n + 1)
        t2 = time.perf_counter()
        return batch * n / max((t2 - t1) - (t1 - t0), 1e-9)

    def prefill(self, n: int) -> float:
        from tramontane import KVCache
        from tramontane.generate import prefill
        from tramontane.step_backends import choose_backend

        ids = prompts(1, n, self.vocab)[0]
        cache = KVCache.create(self.model.args, 1, n + 1, dtype=self.model.dtype)
        step = choose_backend(self.model)
        with self.torch.inference_mode():
            prefill(step, ids[:32], cache, 0, 512)
            cache.reset()
            t0 = time.perf_counter()
            prefill(step, ids, cache, 0, 512)
        return n / (time.perf_counter() - t0)


class Llama:
    """llama.cpp's own C++ `llama-bench` (built by llama_tools.py) on the file, one run per command: its
    tg (decode after no prompt) and pp (prefill) tests. Its peak RSS is that of the largest run."""

    def __init__(self, path: str, threads: int) -> None:
        self.path, self.threads = Path(path), threads

    def decode(self, batch: int, n: int) -> float:
        from llama_tools import llama_bench

        if batch != 1:
            raise ValueError("llama-bench decodes one sequence")
        return llama_bench(self.path, self.threads, 0, n)

    def prefill(self, n: int) -> float:
        from llama_tools import llama_bench

        return llama_bench(self.path, self.threads, n, 0)


class HF:
    def __init__(self, path: str, gguf: bool) -> None:
        import torch
        import transformers

        self.torch = torch
        p = Path(path)
        kw: dict[str, Any] = {"dtype": torch.float32}
        if gguf:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, **kw).eval()
        else:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(p, **kw).eval()
        self.vocab = self.model.config.vocab_size

    def _gen(self, ids: Any, n: int) -> None:
        self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, eos_token_id=None, pad_token_id=0)

    def decode(self, batch: int, n: int) -> float:
        ids = self.torch.tensor(prompts(batch, 16, self.vocab))
        with self.torch.inference_mode():
            self._gen(ids, 2)
            t0 = time.perf_counter()
            self._gen(ids, 1)
            t1 = time.perf_counter()
            self._gen(ids, n + 1)
            t2 = time.perf_counter()
        return batch * n / max((t2 - t1) - (t1 - t0), 1e-9)

    def prefill(self, n: int) -> float:
        ids = self.torch.tensor(prompts(1, n, self.vocab))
        with self.torch.inference_mode():
            self.model(ids[:, :32])
            t0 = time.perf_counter()
            self.model(ids, logits_to_keep=1)
        return n / (time.perf_counter() - t0)


def main() -> None:
    from common import current_rss_bytes, peak_rss_bytes

    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["ours", "llama", "hf"])
    ap.add_argument("path")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--gguf", action="store_true")
    ap.add_argument("--dequantize", action="store_true", help="ours: a GGUF file's blocks as floats")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--isa", default=None, help="ours: the kernels' instruction set (amx, avx512, avx_vnni, avx2), "
                    "lowered with set_isa so one CPU shows the paths of others")
    a = ap.parse_args()
    # the libraries are imported before the baseline, so that RSS figures count the model, not the runtime
    if a.kind != "llama":
        import torch

        import tramontane  # noqa: F401

        if a.kind == "hf":
            import transformers  # noqa: F401
        if a.threads:
            torch.set_num_threads(a.threads)
        if a.isa:
            from tramontane.kernels import load_kernels

            ext = load_kernels()
            if ext is None or a.isa not in ext.isas():
                raise SystemExit(f"--isa {a.isa}: this CPU's kernels run {ext.isas() if ext else 'none'}")
            ext.set_isa(a.isa)
    base = current_rss_bytes()
    t0 = time.perf_counter()
    system: Ours | Llama | HF
    if a.kind == "ours":
        system = Ours(a.path, a.quantize, a.dequantize)
    elif a.kind == "llama":
        import os

        system = Llama(a.path, a.threads or os.cpu_count() or 1)
    else:
        system = HF(a.path, a.gguf)
    print(json.dumps({"ready": True, "load_s": time.perf_counter() - t0, "base_rss": base,
                      "rss": current_rss_bytes(), "load_peak_rss": peak_rss_bytes()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "decode":
                out: dict[str, Any] = {"tok_s": system.decode(cmd["batch"], cmd["n"])}
            elif cmd["cmd"] == "prefill":
                out = {"tok_s": system.prefill(cmd["n"])}
            elif cmd["cmd"] == "rss" and a.kind == "llama":  # its runs are child processes
                out = {"peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "base_rss": 0}
            elif cmd["cmd"] == "rss":
                out = {"peak_rss": peak_rss_bytes(), "base_rss": base}
            else:
                break
        except Exception as e:  # report, keep serving
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
