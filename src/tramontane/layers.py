"""The building blocks of a Llama-shaped transformer. Parameter names follow Mistral's native checkpoints."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs, MoeArgs
from .cache import StepMeta
from .rope import apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op on the decode path
        # Normalise in fp32 and cast back before the weight, as the reference implementations do.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings, over the KV cache when there is one."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # Set by `fuse.fuse_projections`: wq, wk and wv stacked by rows, one matmul instead of three.
        self.wqkv: nn.Module | None = None

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, meta: StepMeta, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is not None and meta.fused is not None:
            # one call: rotary, cache write and attention for this token of every sequence
            view = meta.view
            assert view is not None and meta.rot is not None  # the step backend set them with `fused`
            out = meta.fused.decode_attention(self.wqkv(x).view(B, -1), meta.rot, *view.layer(layer), view.tables,
                                              view.key_pos, view.write, meta.positions.view(-1), view.window,
                                              view.scan, H, KV)
            return self.wo(out.view(B, 1, H * D))
        if self.wqkv is None:
            q = apply_rotary(self.wq(x).view(B, T, H, D), freqs_cis)
            k = apply_rotary(self.wk(x).view(B, T, KV, D), freqs_cis)
            v = self.wv(x).view(B, T, KV, D)
        else:
            qkv = self.wqkv(x).view(B, T, H + 2 * KV, D)
            qk = apply_rotary(qkv[:, :, : H + KV], freqs_cis)  # q and k heads rotated together
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + KV :]
        keys, values = meta.layer_kv(layer, k.transpose(1, 2), v.transpose(1, 2))  # [B, kv_heads, K, head_dim]
        q = q.transpose(1, 2)  # [B, heads, T, head_dim]
        if meta.spans is not None:  # packed sequences, each attending only to itself
            out = torch.cat([attend(q[:, :, s:e], keys[:, :, s:e], values[:, :, s:e], None, True)
                             for s, e in meta.spans], dim=2)
        else:
            out = attend(q, keys, values, meta.attention_mask(), meta.is_causal)  # [B, heads, T, head_dim]
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """Scaled dot-product attention of q [B, H, T, D] over k, v [B, KV, K, D], H a multiple of KV.

    With a mask, the `H // KV` query heads that share a key head are stacked along the query axis,
    so keys and values are never repeated in memory.
    """
    B, H, T, D = q.shape
    kv = k.shape[1]
    rep = H // kv
    if mask is None:
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if is_causal and T == k.shape[2] and CAUSAL_BLOCK < T <= CAUSAL_BLOCKS_UP_TO and q.device.type == "cpu" \
                and not q.requires_grad:  # (measured for inference; training keeps one call)
            return causal_in_blocks(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    if rep == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q = q.reshape(B, kv, rep * T, D)  # heads kv*rep + r -> group kv, rows (r, t)
    if T > 1:
        mask = mask.unsqueeze(2).expand(B, 1, rep, T, mask.shape[-1]).reshape(B, 1, rep * T, mask.shape[-1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, kv, rep * T, D]
    return out.reshape(B, H, T, D)  # a view on the CPU; CUDA's kernels may hand back other strides


# Queries per call of `causal_in_blocks`, and the longest chunk it pays for: measured on Zen 5 (2 threads)
# against PyTorch's causal SDPA, 9 or 32 heads: 1.3x faster at 512 queries, 1.1x at 1024, none at 2048.
CAUSAL_BLOCK = 64
CAUSAL_BLOCKS_UP_TO = 1024


def causal_in_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q over k, v (all [B, H, T, D]) as one call per block of CAUSAL_BLOCK queries over
    the keys up to the block's end: PyTorch's CPU flash attention scored every key of a chunk of up to
    about a thousand even when causal (512 queries took as long causal as full), so the blocks skip what
    lies above the diagonal."""
    T = q.shape[2]
    outs = []
    for s in range(0, T, CAUSAL_BLOCK):
        e = min(s + CAUSAL_BLOCK, T)
        # query s + i sees keys 0..s + i
        mask = torch.ones(e - s, e, dtype=torch.bool, device=q.device).tril(diagonal=s)
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], attn_mask=mask))
    return torch.cat(outs, dim=2)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w13: nn.Module | None = None  # set by `fuse.fuse_projections`: w1 and w3 stacked by rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class MoeFeedForward(nn.Module):
    """Mixtral's sparse mixture of experts: each token goes to its top-k experts, weighted by a softmax
    over those k router logits."""

    def __init__(self, dim: int, hidden_dim: int, moe: MoeArgs) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, moe.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(dim, hidden_dim) for _ in range(moe.num_experts))
        self.top_k = moe.num_experts_per_tok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return route_to_experts(x, self.gate, self.top_k, self.experts.__getitem__)


def route_to_experts(x: torch.Tensor, gate: nn.Module, top_k: int,
                     expert: Callable[[int], nn.Module | None]) -> torch.Tensor:
    """Each token of `x` through its top-k experts by `gate`, weighted by a softmax over those k logits.
    `expert(e)` is expert e's module, or None where this process does not hold it (its share of the sum
    is then left out: another rank adds it)."""
    flat = x.reshape(-1, x.shape[-1])  # [N, dim]
    logits, chosen = torch.topk(gate(flat), top_k, dim=-1)  # [N, k]
    weights = torch.softmax(logits.float(), dim=-1).type_as(x)
    out = torch.zeros_like(flat)
    for e in chosen.unique().tolist():
        module = expert(e)
        if module is None:
            continue
        token, slot = torch.where(chosen == e)
        out.index_add_(0, token, module(flat[token]) * weights[token, slot, None])
    return out.view_as(x)


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward: nn.Module
        if args.moe is not None:
            self.feed_forward = MoeFeedForward(args.dim, args.hidden_dim, args.moe)
        else:
            self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, meta: StepMeta, layer: int) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, meta, layer)
        return h + self.feed_forward(self.ffn_norm(h))
