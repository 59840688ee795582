// What int4.cpp defines: products with int4 weights in groups (with or without minimums), and their floats;
// products with GGUF Q5_0 / Q5_1 rows interleaved by eights (blocks.cpp's block_linear calls it).
#pragma once

#include "common.h"

at::Tensor int4_linear(at::Tensor x, at::Tensor w, at::Tensor scale, c10::optional<at::Tensor> mins,
                          int64_t group, bool interleaved = false);
at::Tensor int4_dequantize(at::Tensor w, at::Tensor scale, c10::optional<at::Tensor> mins, int64_t group,
                           bool interleaved = false, bool bf16 = false);
// x @ dequant(W).T for N Q5_0 (or with_mins: Q5_1) rows of K elements, interleaved by eights (int4.cpp)
at::Tensor q5_r8_linear(at::Tensor x, at::Tensor w, int64_t K, bool with_mins);
