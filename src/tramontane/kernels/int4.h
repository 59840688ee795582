// What int4.cpp defines: products with int4 weights in groups (with or without minimums), and their floats.
#pragma once

#include "common.h"

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> mins,
                          int64_t group);
torch::Tensor int4_dequantize(torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> mins, int64_t group);
