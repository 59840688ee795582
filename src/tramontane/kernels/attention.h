// What attention.cpp defines: a decode step's attention over a paged (or contiguous) KV cache.
#pragma once

#include "common.h"

torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor rot, torch::Tensor kcache, torch::Tensor vcache,
                               c10::optional<torch::Tensor> kscale, c10::optional<torch::Tensor> vscale,
                               torch::Tensor tables, torch::Tensor key_pos, torch::Tensor write, torch::Tensor q_pos,
                               int64_t window, int64_t scan, int64_t n_heads, int64_t n_kv_heads);
