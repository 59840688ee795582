"""The JAX model against the torch one: logits on the tiny models from native and Hugging Face folders
and GGUF files (fp32, 1e-4), greedy tokens on the real SmolLM2 weights, and loading without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tramontane import generate, load_model, save_model

jax = pytest.importorskip("jax", reason="the [jax] extra is not installed")
import jax.numpy as jnp  # noqa: E402

from tramontane.jax import forward, init_cache, load_params  # noqa: E402
from tramontane.jax import generate as jax_generate  # noqa: E402

TOKENS = [[3, 17, 42, 99, 5, 8, 64, 21, 1, 2, 7, 100, 11, 12]]


@pytest.mark.parametrize("fmt", ["hf", "native"])
def test_logits_equal_torch(tiny_hf, tiny_name: str, fmt: str, tmp_path: Path) -> None:
    _, folder = tiny_hf(tiny_name)
    if fmt == "native":
        save_model(load_model(folder), tmp_path / "native", to="native")
        folder = tmp_path / "native"
    with torch.no_grad():
        want = load_model(folder)(torch.tensor(TOKENS)).numpy()
    params, args = load_params(folder)
    got, _ = forward(params, args, jnp.asarray(TOKENS), 0, init_cache(args, 1, len(TOKENS[0])))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_cached_steps_equal_one_pass(tiny_hf) -> None:
    """Prefill a prefix, then feed the rest a token at a time: the same logits as one forward (the
    sliding window of 8 is shorter than the sequence)."""
    _, folder = tiny_hf("mistral-window")
    params, args = load_params(folder)
    tokens = jnp.asarray(TOKENS)
    full, _ = forward(params, args, tokens, 0, init_cache(args, 1, tokens.shape[1]))
    logits, cache = forward(params, args, tokens[:, :5], 0, init_cache(args, 1, tokens.shape[1]))
    steps = [logits]
    for t in range(5, tokens.shape[1]):
        logits, cache = forward(params, args, tokens[:, t:t + 1], t, cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], axis=1), np.asarray(full),
                               rtol=1e-4, atol=1e-4)


def test_greedy_tokens_equal_torch(tiny_hf, tiny_name: str) -> None:
    _, folder = tiny_hf(tiny_name)
    want = generate(load_model(folder), [TOKENS[0][:6]], max_tokens=12, temperature=0.0)[0].tokens
    params, args = load_params(folder)
    assert jax_generate(params, args, TOKENS[0][:6], max_tokens=12) == want


@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_torch(smollm2_gguf_path: Path) -> None:
    from tramontane import load_tokenizer

    prompt = load_tokenizer(smollm2_gguf_path).encode("The capital of France is", bos=True)
    want = generate(load_model(smollm2_gguf_path, dequantize=True), [prompt], max_tokens=16,
                    temperature=0.0)[0].tokens
    params, args = load_params(smollm2_gguf_path)
    assert jax_generate(params, args, prompt, max_tokens=16) == want


def test_sampling_is_seeded(tiny_hf) -> None:
    _, folder = tiny_hf("llama-tied")
    params, args = load_params(folder)
    a = jax_generate(params, args, [1, 2, 3], max_tokens=8, temperature=1.0, seed=5)
    b = jax_generate(params, args, [1, 2, 3], max_tokens=8, temperature=1.0, seed=5)
    assert a == b and len(a) == 8


def test_loads_without_torch(tiny_hf) -> None:
    _, folder = tiny_hf("mixtral")
    code = ("import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
            "from tramontane.jax import load_params, generate\n"
            f"params, args = load_params({str(folder)!r})\n"
            "print(generate(params, args, [1, 2, 3], max_tokens=4))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(eval(out.stdout)) == 4


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_loads_without_torch_and_gives_torchs_logits(tiny_hf, qtype: str, tmp_path: Path) -> None:
    """A GGUF file (Mixtral: experts stacked per layer) read by `gguf_file`/`gguf_args` and dequantized
    by gguf-py in a process where torch cannot be imported: the logits of torch's loader of that file."""
    from tramontane.fuse import unfused_state_dict
    from tramontane.loading.gguf_write import write_gguf

    _, folder = tiny_hf("mixtral")
    ours = load_model(folder)
    path = tmp_path / f"m.{qtype}.gguf"
    write_gguf(path, ours.args, unfused_state_dict(ours.state_dict(), ours), qtype=qtype)
    with torch.no_grad():
        want = load_model(path, dequantize=True)(torch.tensor(TOKENS)).numpy()
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, jax.numpy as jnp\n"
            "from tramontane.jax import forward, init_cache, load_params\n"
            f"params, args = load_params({str(path)!r})\n"
            f"tokens = jnp.asarray({TOKENS!r})\n"
            "logits, _ = forward(params, args, tokens, 0, init_cache(args, 1, tokens.shape[1]))\n"
            f"np.save({str(tmp_path / 'got.npy')!r}, np.asarray(logits))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "got.npy"), want, rtol=1e-4, atol=1e-4)


def test_bad_folder_names_it(tmp_path: Path) -> None:
    from tramontane import CheckpointError

    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_params(tmp_path)
