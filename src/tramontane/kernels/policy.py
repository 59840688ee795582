"""Which kernel runs what: decided once per process, from the CPU's features, never from timings.

Quantized and fp32 layers, and the native decode stack, ask the one `KernelPolicy` instead of each
deciding for itself: up to `small_batch` rows of activations (decode) the vector kernels win; beyond,
weights are dequantized `prefill_tile` output rows at a time and multiplied in `gemm_dtype`. Training
keeps its frozen float products in the same `gemm_dtype`. The instruction set is the kernels' own
choice (the best the CPU has, `Kernels.isa()`), which tests lower with `set_isa`.

Example:
    >>> p = kernel_policy()
    >>> p.gemm_dtype, p.vector_wins(rows=4, amx_tiles=False, in_features=4096)
    (torch.bfloat16, True)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import Kernels, qlinear


@dataclass(frozen=True)
class KernelPolicy:
    kernels: Kernels | None  # the compiled kernels; None: plain PyTorch everywhere
    # Up to this many rows of activations the kernels win; beyond, dequantize and use a GEMM.
    small_batch: int = 16
    # Output rows dequantized at a time for a GEMM (measured on the 1B shape, 512 rows: 1024 rows beat
    # dequantizing whole matrices by 10%; smaller tiles pay for more, smaller GEMMs).
    prefill_tile: int = 1024
    # The operands of big float products: a quantized layer's dequantized tiles (beyond small_batch
    # rows) and training's frozen products (lora.lower_frozen). bf16 only with AMX tiles, where PyTorch's
    # bf16 GEMM ran 6.4x its fp32 one on this project's Xeon. With AVX512-BF16 alone (oneDNN held to it
    # by ONEDNN_MAX_CPU_ISA, our kernels by set_isa) bf16 lost: the GEMM ran 0.68x fp32 and the prefill
    # products of int4/int8 layers 0.62x, as the instruction does (vdpbf16ps gives 0.51x the
    # multiply-adds of fp32 FMA there, benchmarks/dot_rates.py). A CPU whose bf16 dot outruns its FMA
    # (not measured here) can still ask for bf16: `--base-dtype bfloat16` for training.
    gemm_dtype: torch.dtype = torch.float32

    @classmethod
    def detect(cls) -> KernelPolicy:
        kernels = qlinear()
        amx = kernels is not None and "amx" in kernels.isas()
        return cls(kernels, gemm_dtype=torch.bfloat16 if amx else torch.float32)

    def vector_wins(self, rows: int, amx_tiles: bool, in_features: int) -> bool:
        """Whether a quantized layer's kernel beats dequantize + GEMM for `rows` rows of activations: at
        decode sizes always; at any size on AMX for a kernel whose AMX path decodes each block of 32 to
        bf16 once for all rows (`amx_tiles`: int4, int8 and the GGUF block formats, 2x faster than the
        GEMM), which takes rows of whole blocks of 32 only."""
        if rows <= self.small_batch:
            return True
        return amx_tiles and in_features % 32 == 0 and self.kernels is not None and self.kernels.isa() == "amx"


@functools.lru_cache(maxsize=1)
def kernel_policy() -> KernelPolicy:
    """This process's policy (see the module's docstring)."""
    return KernelPolicy.detect()
