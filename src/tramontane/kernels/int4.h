// What int4.cpp defines: products with int4 weights in groups (with or without minimums), and their floats.
#pragma once

#include "common.h"

at::Tensor int4_linear(at::Tensor x, at::Tensor w, at::Tensor scale, c10::optional<at::Tensor> mins,
                          int64_t group, bool interleaved = false);
at::Tensor int4_dequantize(at::Tensor w, at::Tensor scale, c10::optional<at::Tensor> mins, int64_t group,
                           bool interleaved = false, bool bf16 = false);
