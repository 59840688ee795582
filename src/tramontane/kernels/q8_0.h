// Q8_0, a GGUF block format (the contract: block_format.h).
#pragma once

#include "block_format.h"

namespace blockfmt {

// Q8_0: blocks of 32: float16 d, 32 x int8; value = d * q.
struct Q8_0 {
  static constexpr int64_t kUnit = 64, kBytes = 68, kCodeBits = 8, kScaleSpan = 32;
  static void scales(const uint8_t* u, float* sc, float* off) {
    for (int b = 0; b < 2; ++b) {
      const float d = half_at(u + 34 * b);
      sc[2 * b] = sc[2 * b + 1] = d;
      off[2 * b] = off[2 * b + 1] = -128.f * d;
    }
  }
  static int code(const uint8_t* u, int64_t i) { return (u[34 * (i / 32) + 2 + i % 32] ^ 0x80); }
#ifdef TRAMONTANE_X86
  T256 static void scales8(const uint8_t* u, int64_t n, __m256& sc, __m256& off) {
    sc = halves(u, 34, 2 * n);
    off = _mm256_mul_ps(sc, _mm256_set1_ps(-128.f));
  }
  T256 static __m256i codes32(const uint8_t* u, int64_t j) {
    return _mm256_xor_si256(load32(u + 34 * j + 2), _mm256_set1_epi8(char(0x80)));
  }
#endif
};

}  // namespace blockfmt
