// What attention.cpp defines: a decode step's attention over a paged (or contiguous) KV cache.
#pragma once

#include "common.h"

at::Tensor decode_attention(at::Tensor qkv, at::Tensor rot, at::Tensor kcache, at::Tensor vcache,
                               c10::optional<at::Tensor> kscale, c10::optional<at::Tensor> vscale,
                               at::Tensor tables, at::Tensor key_pos, at::Tensor write, at::Tensor q_pos,
                               int64_t window, int64_t scan, int64_t n_heads, int64_t n_kv_heads);
