"""The transformer as pure JAX functions: `forward(params, args, tokens, start, cache)`.

Weights are a dict: `tok_embeddings` [V, D], `norm` [D], `output` [V, D] (absent when tied) and
`layers`, each layer tensor stacked on a leading layer axis so that the blocks run as one `lax.scan`:
`attention_norm`, `ffn_norm` [L, D], `wq` [L, H*hd, D], `wk`/`wv` [L, KV*hd, D], `wo` [L, D, H*hd],
and `w1`/`w3` [L, F, D], `w2` [L, D, F] (with an expert axis after L, and `gate` [L, E, D], for Mixtral).
Rows of wq/wk are in Mistral's native rotary layout (consecutive pairs), as in the torch model.

The KV cache holds every position (slot = position; a sliding window is a mask, not a rolling buffer),
so a cache is sized for the longest sequence it will see.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ..args import ModelArgs

Params = dict[str, Any]


class Cache(NamedTuple):
    k: jax.Array  # [L, B, KV, S, hd]
    v: jax.Array  # [L, B, KV, S, hd]


def init_cache(args: ModelArgs, batch: int, length: int, dtype: Any = jnp.float32) -> Cache:
    """An empty cache for `batch` sequences of up to `length` positions."""
    shape = (args.n_layers, batch, args.n_kv_heads, length, args.head_dim)
    return Cache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight


def rotate(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate consecutive pairs of `x` [B, T, heads, hd] by position x frequency (computed in fp32)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, hd/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], hd // 2, 2)  # [B, T, heads, hd/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _write(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """`new` [B, KV, T, hd] into `cache` [B, KV, S, hd] at slots start..start+T-1."""
    return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0, 0, start, 0))


def _attention(args: ModelArgs, p: Params, x: jax.Array, positions: jax.Array, start: jax.Array,
               k_cache: jax.Array, v_cache: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    B, T, _ = x.shape
    H, KV, hd = args.n_heads, args.n_kv_heads, args.head_dim
    q = rotate((x @ p["wq"].T).reshape(B, T, H, hd), positions, args.rope_theta)
    k = rotate((x @ p["wk"].T).reshape(B, T, KV, hd), positions, args.rope_theta)
    v = (x @ p["wv"].T).reshape(B, T, KV, hd)
    k_cache = _write(k_cache, k.transpose(0, 2, 1, 3), start)
    v_cache = _write(v_cache, v.transpose(0, 2, 1, 3), start)
    S = k_cache.shape[2]
    key_pos = jnp.arange(S)[None, :]  # slot = position
    query_pos = positions[0][:, None]  # [T, 1]: every row of a batch shares its positions
    allowed = key_pos <= query_pos
    if args.sliding_window is not None:
        allowed &= query_pos - key_pos < args.sliding_window
    rep = H // KV
    qg = q.astype(jnp.float32).reshape(B, T, KV, rep, hd)  # query heads grouped by their key head
    scores = jnp.einsum("btgrd,bgsd->bgrts", qg, k_cache.astype(jnp.float32)) / jnp.sqrt(jnp.float32(hd))
    scores = jnp.where(allowed[None, None, None], scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bgrts,bgsd->btgrd", weights, v_cache.astype(jnp.float32)).reshape(B, T, H * hd)
    return out.astype(x.dtype) @ p["wo"].T, k_cache, v_cache


def _swiglu(w1: jax.Array, w2: jax.Array, w3: jax.Array, x: jax.Array) -> jax.Array:
    return (jax.nn.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def _feed_forward(args: ModelArgs, p: Params, x: jax.Array) -> jax.Array:
    if args.moe is None:
        return _swiglu(p["w1"], p["w2"], p["w3"], x)
    # Every expert runs on every token and the router's top-k weights pick: exact and simple to trace,
    # at num_experts / k times the arithmetic of dispatching tokens.
    logits, chosen = jax.lax.top_k(x @ p["gate"].T, args.moe.num_experts_per_tok)  # [B, T, k]
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    outs = jax.vmap(_swiglu, in_axes=(0, 0, 0, None))(p["w1"], p["w2"], p["w3"], x)  # [E, B, T, D]
    picked = jnp.take_along_axis(outs.transpose(1, 2, 0, 3), chosen[..., None], axis=2)  # [B, T, k, D]
    return jnp.sum(picked * weights[..., None], axis=2)


def forward(params: Params, args: ModelArgs, tokens: jax.Array, start: jax.Array | int,
            cache: Cache) -> tuple[jax.Array, Cache]:
    """Logits [B, T, V] of `tokens` [B, T] at positions start..start+T-1, and the cache with their keys
    and values written."""
    B, T = tokens.shape
    start = jnp.asarray(start, jnp.int32)
    positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    h = params["tok_embeddings"][tokens]

    def block(h: jax.Array, layer: tuple[Params, jax.Array, jax.Array]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        p, k_cache, v_cache = layer
        attn, k_cache, v_cache = _attention(args, p, rms_norm(h, p["attention_norm"], args.norm_eps), positions,
                                            start, k_cache, v_cache)
        h = h + attn
        h = h + _feed_forward(args, p, rms_norm(h, p["ffn_norm"], args.norm_eps))
        return h, (k_cache, v_cache)

    h, (k, v) = jax.lax.scan(block, h, (params["layers"], cache.k, cache.v))
    h = rms_norm(h, params["norm"], args.norm_eps)
    head = params["tok_embeddings"] if args.tied_embeddings else params["output"]
    return (h @ head.T).astype(jnp.float32), Cache(k, v)


def generate(params: Params, args: ModelArgs, prompt: list[int], max_tokens: int, *, temperature: float = 0.0,
             seed: int = 0, stop: tuple[int, ...] = ()) -> list[int]:
    """The tokens that follow `prompt`: greedy at temperature 0, else sampled from softmax(logits / T)
    with `jax.random` seeded by `seed`. Stops after `max_tokens` or at a token in `stop` (kept)."""
    if not prompt:
        raise ValueError("prompt: need at least one token")
    if max_tokens < 1:
        raise ValueError(f"max_tokens: need at least 1, got {max_tokens}")
    dtype = params["tok_embeddings"].dtype
    cache = init_cache(args, 1, len(prompt) + max_tokens, dtype)

    @jax.jit
    def step(params: Params, tokens: jax.Array, start: jax.Array | int, cache: Cache) -> tuple[jax.Array, Cache]:
        return forward(params, args, tokens, start, cache)  # args are fixed: traced once per shape

    logits, cache = step(params, jnp.asarray([prompt], jnp.int32), 0, cache)
    key = jax.random.PRNGKey(seed)
    out: list[int] = []
    for i in range(max_tokens):
        last = logits[0, -1]
        if temperature <= 0:
            token = int(jnp.argmax(last))
        else:
            key, sub = jax.random.split(key)
            token = int(jax.random.categorical(sub, last / temperature))
        out.append(token)
        if token in stop or i == max_tokens - 1:
            break
        logits, cache = step(params, jnp.asarray([[token]], jnp.int32), len(prompt) + i, cache)
    return out
