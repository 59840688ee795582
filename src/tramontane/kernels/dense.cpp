// Weight-only quantized matrix multiplication for CPU decode: y[M, N] = x[M, K] @ dequant(W)[N, K]^T,
// for fp32 and int8 (one scale per output channel) weights; int4 lives in int4.cpp, the GGUF block
// formats in blocks.cpp.
//
// A decode step reads every weight once, so speed is memory bandwidth over weight bytes. These
// kernels convert int8 weights to fp32 in registers and multiply-accumulate with fp32 activations.
// Each weight row is converted once and used for every row of x (batched decode), while it sits in L1.
//
// Paths: AVX-512 and AVX2 (chosen at run time; dense_tiles.h, written once over the vector width), and
// portable C++ elsewhere. Threads split the output rows through ATen's parallel_for, so the kernels share
// PyTorch's thread pool.

#include "amx.h"
#include "dense.h"
#include "simd.h"

namespace {

// ---------------------------------------------------------------------------------------- portable
void int8_rows_ref(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, float* y,
                   int64_t N, int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    const int8_t* row = w + o * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += float(row[k]) * xm[k];
      y[m * N + o] = acc * scale[o];
    }
  }
}

#define TRAMONTANE_TILES "dense_tiles.h"
#include "per_isa.h"

}  // namespace

at::Tensor int8_linear(at::Tensor x, at::Tensor w, at::Tensor scale) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(), "w must be contiguous int8 [N, K]");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(scale.numel() == N && scale.scalar_type() == at::kFloat && scale.is_contiguous(), "scale must be float32 [N]");
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M >= kAmxMinRowsInt8 && K % 32 == 0 && amx_in_use()) {
    int8_linear_amx(xp, M, K, wp, sp, yp, N);
    return y;
  }
  parallel_pieces(N, grain(N), [&](int64_t begin, int64_t end) {
    BY_ISA(dense_rows(xp, M, K, wp, sp, yp, N, begin, end), return);
    int8_rows_ref(xp, M, K, wp, sp, yp, N, begin, end);
  });
  return y;
}

at::Tensor f32_linear(at::Tensor x, at::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous(), "w must be contiguous float32 [N, K]");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check_x(x, K);
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (current_isa() == Isa::kRef) return at::matmul(x, w.t());
  parallel_pieces(N, grain(N), [&](int64_t begin, int64_t end) {
    BY_ISA(dense_rows(xp, M, K, wp, static_cast<const float*>(nullptr), yp, N, begin, end), return);
  });
  return y;
}
