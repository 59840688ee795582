"""Helpers shared by the benchmarks: random checkpoints, memory readings, timing."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from tramontane import ModelArgs
from tramontane.loading import hf, native

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"  # generated checkpoints (git-ignored)
RESULTS = HERE / "results"
T = TypeVar("T")

# ~1.0B parameters, Mistral-shaped (GQA 16/8, head_dim 128, SwiGLU)
MISTRAL_1B = ModelArgs(dim=2048, n_layers=16, head_dim=128, hidden_dim=7168, n_heads=16, n_kv_heads=8,
                       norm_eps=1e-5, vocab_size=32000, rope_theta=1e6, sliding_window=4096, max_seq_len=32768)


def random_quantized_gguf(path: Path, args: ModelArgs, tokenizer: dict[str, Any], qtype: str = "Q4_0",
                          seed: int = 0) -> Path:
    """A GGUF of `args` whose every matrix is random Q4_0 or Q8_0 blocks, written without ever holding
    floats (a 7B model as fp32 would not fit in memory here). Element std is about cols ** -0.5."""
    import numpy as np
    from gguf import GGMLQuantizationType

    from tramontane.loading.gguf_write import write_gguf_blocks

    rng = np.random.default_rng(seed)
    # (ggml type, bytes of values per block of 32, std of the block's integers)
    kind, nbytes, std = {"Q4_0": (GGMLQuantizationType.Q4_0, 16, 4.6),  # uniform q - 8 in -8..7
                         "Q8_0": (GGMLQuantizationType.Q8_0, 32, 73.6)}[qtype]  # uniform q in -127..127

    def blocks(name: str, shape: tuple[int, ...]) -> tuple[Any, GGMLQuantizationType | None]:
        if len(shape) == 1:
            return np.ones(shape, dtype=np.float32), None
        rows, cols = shape
        raw = np.empty((rows, cols // 32, 2 + nbytes), dtype=np.uint8)  # float16 scale, then the values
        if qtype == "Q4_0":
            raw[..., 2:] = rng.integers(0, 256, size=(rows, cols // 32, nbytes), dtype=np.uint8)
        else:
            raw[..., 2:] = rng.integers(-127, 128, size=(rows, cols // 32, nbytes), dtype=np.int8).view(np.uint8)
        scale = (cols**-0.5 / std * rng.uniform(0.5, 1.5, size=(rows, cols // 32))).astype(np.float16)
        raw[..., :2] = scale.view(np.uint8).reshape(rows, cols // 32, 2)
        return raw.reshape(rows, cols // 32 * (2 + nbytes)), kind

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        write_gguf_blocks(tmp, args, blocks, tokenizer)
        tmp.rename(path)
    return path


def random_state_dict(args: ModelArgs, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    from tramontane.loading.common import expected_shapes

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(args).items():
        if len(shape) == 1:
            out[name] = torch.ones(shape, dtype=dtype)
        else:
            out[name] = (torch.randn(shape, generator=g) * shape[-1] ** -0.5).to(dtype)
    return out


def ensure_checkpoint(name: str, args: ModelArgs, fmt: str = "native", dtype: torch.dtype = torch.float32) -> Path:
    """A random checkpoint under benchmarks/work/, written once and reused."""
    folder = WORK / f"{name}-{fmt}-{str(dtype).removeprefix('torch.')}"
    marker = folder / "params.json" if fmt == "native" else folder / "config.json"
    if not marker.is_file():
        state = random_state_dict(args, dtype)
        (native.save if fmt == "native" else hf.save)(folder, args, state, dtype)
    return folder


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# the CPU features that pick our kernels' paths (and llama.cpp's): which kind of x86 CPU a figure came from
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")


def machine() -> dict[str, Any]:
    """The CPU (name, family and model: an AMD EPYC of family 25 is Zen 3 or 4, of 26 Zen 5; the kernel
    features it has), cores, torch and threads of a run."""
    info = {"model name": platform.processor(), "cpu family": "?", "model": "?", "flags": ""}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in info and info[key.strip()] in ("", "?", platform.processor()):
                    info[key.strip()] = value.strip()
                if not line.strip():
                    break  # the first CPU is enough
    except OSError:
        pass
    flags = set(info["flags"].split())
    return {"cpu": info["model name"], "cpu_id": f"family {info['cpu family']} model {info['model']}",
            "features": [f for f in FEATURES if f in flags], "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}


def save_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    return path


def poll_server(proc: subprocess.Popen, label: str, answer: Callable[[], T | None], interval: float,
                exited: Callable[[], str] = lambda: "") -> T:
    """The first result of `answer()` that is not None (an HTTP error counts as None), asked every
    `interval` seconds while the server started as `proc` runs.

    Raises RuntimeError when `proc` exits first (with `exited()`'s detail) or after 300 s."""
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{label} exited with {proc.returncode}{exited()}")
        try:
            result = answer()
        except httpx.HTTPError:
            result = None
        if result is not None:
            return result
        time.sleep(interval)
    raise RuntimeError(f"{label} did not answer in 300 s")


def wait_for_server(proc: subprocess.Popen, url: str, label: str, exited: Callable[[], str] = lambda: "") -> str:
    """The first model id that `url`/v1/models names, once the server started as `proc` answers there
    (`poll_server`)."""
    import httpx

    def model_id() -> str | None:
        r = httpx.get(f"{url}/v1/models", timeout=2)
        return str(r.json()["data"][0]["id"]) if r.status_code == 200 else None

    return poll_server(proc, label, model_id, 0.5, exited)


def stop_server(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """SIGTERM, then SIGKILL if it is not gone within 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
