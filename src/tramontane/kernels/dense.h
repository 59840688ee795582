// What dense.cpp defines: products with fp32 weights and with int8 weights (a scale per output channel).
#pragma once

#include "common.h"

torch::Tensor f32_linear(torch::Tensor x, torch::Tensor w);
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale);
