// What blocks.cpp defines: the GGUF quantization formats, by ggml type number: (elements, bytes) per unit,
// the rows of x from which products run on AMX tiles, products and dequantization.
#pragma once

#include "common.h"

#include <tuple>

std::tuple<int64_t, int64_t> block_unit(int64_t kind);
int64_t block_amx_min_rows(int64_t kind);
// interleaved: Q5_0, Q5_1 or Q8_0 rows interleaved by eights (int4.cpp's R8Rows), as gguf_linear.py repacks them
at::Tensor block_linear(at::Tensor x, at::Tensor w, int64_t kind, bool interleaved = false);
at::Tensor block_dequantize(at::Tensor w, int64_t kind, bool bf16 = false, bool interleaved = false);
