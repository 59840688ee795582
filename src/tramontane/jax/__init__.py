"""The same Mistral/Llama architecture in JAX: pure functions over a pytree of weights, for TPUs and
for JAX users (transformers 5 dropped its Flax classes).

GQA, sliding windows, Mixtral experts and tied embeddings, as `tramontane.model`; weights read with
safetensors from native and Hugging Face folders without torch, GGUF files through tramontane's torch
loader (dequantized to floats). `generate` prefills once and runs one jitted step per token over a
preallocated KV cache.

Example:
    >>> from tramontane.jax import load_params, generate
    >>> params, args = load_params("mistral-7B-v0.3/")
    >>> tokens = generate(params, args, [1, 851, 6333, 1070], max_tokens=16)
"""

from .load import load_params
from .model import Cache, forward, generate, init_cache

__all__ = ["Cache", "forward", "generate", "init_cache", "load_params"]
