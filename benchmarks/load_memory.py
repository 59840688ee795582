"""Peak RSS while loading a random ~1B Mistral-shaped model: loading must not need twice the model.

Each load runs in a fresh subprocess; the figure is (peak RSS - RSS after imports) / bytes of the
loaded weights. Usage: python benchmarks/load_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from common import MISTRAL_1B, ensure_checkpoint, save_result

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {here!r})
from common import current_rss_bytes, peak_rss_bytes
import tramontane
base = current_rss_bytes()
t0 = time.perf_counter()
model = tramontane.load_model({path!r}, dtype=getattr(torch, {dtype!r}))
seconds = time.perf_counter() - t0
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(base=base, peak=peak_rss_bytes(), weights=weights, seconds=seconds)))
"""


def measure(path: str, dtype: str) -> dict:
    from common import HERE

    code = CHILD.format(here=str(HERE), path=path, dtype=dtype)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    cases = [
        ("native fp32 -> fp32", ensure_checkpoint("mistral-1b", MISTRAL_1B, "native", torch.float32), "float32"),
        ("native bf16 -> fp32", ensure_checkpoint("mistral-1b", MISTRAL_1B, "native", torch.bfloat16), "float32"),
        ("native bf16 -> bf16", ensure_checkpoint("mistral-1b", MISTRAL_1B, "native", torch.bfloat16), "bfloat16"),
        ("hf bf16 -> fp32", ensure_checkpoint("mistral-1b", MISTRAL_1B, "hf", torch.bfloat16), "float32"),
    ]
    rows = []
    print(f"{'case':<22} {'weights GiB':>11} {'peak-base GiB':>13} {'ratio':>6} {'load s':>7}")
    for label, path, dtype in cases:
        r = measure(str(path), dtype)
        extra = r["peak"] - r["base"]
        ratio = extra / r["weights"]
        rows.append({"case": label, **r, "ratio": ratio})
        print(f"{label:<22} {r['weights'] / 2**30:>11.2f} {extra / 2**30:>13.2f} {ratio:>6.2f} {r['seconds']:>7.1f}")
    print(f"saved {save_result('load_memory', {'model': 'random Mistral-shaped 1.04B', 'rows': rows})}")


if __name__ == "__main__":
    main()
