// What dense.cpp defines: products with fp32 weights and with int8 weights (a scale per output channel).
#pragma once

#include "common.h"

at::Tensor f32_linear(at::Tensor x, at::Tensor w);
at::Tensor int8_linear(at::Tensor x, at::Tensor w, at::Tensor scale);
