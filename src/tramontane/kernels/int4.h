// What int4.cpp defines: products with int4 weights in groups (with or without minimums), and their floats;
// products with GGUF Q5_0, Q5_1 and Q8_0 rows interleaved by eights (blocks.cpp's block_linear calls it).
#pragma once

#include "common.h"

at::Tensor int4_linear(at::Tensor x, at::Tensor w, at::Tensor scale, c10::optional<at::Tensor> mins,
                          int64_t group, bool interleaved = false);
at::Tensor int4_dequantize(at::Tensor w, at::Tensor scale, c10::optional<at::Tensor> mins, int64_t group,
                           bool interleaved = false, bool bf16 = false);
// x @ dequant(W).T for N rows of K elements of Q5_0 (bits 5), Q5_1 (5, with_mins) or Q8_0 (8), interleaved
// by eights (int4.cpp)
at::Tensor r8_block_linear(at::Tensor x, at::Tensor w, int64_t K, int bits, bool with_mins);
// Row o of such rows back in the format's own blocks (K / 32 of them) at out, for its dequantization
void r8_row_in_order(const uint8_t* w, int64_t K, int bits, bool with_mins, int64_t o, uint8_t* out);
