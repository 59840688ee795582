// Q5_0 and Q5_1, a GGUF block format (the contract: block_format.h).
#pragma once

#include "block_format.h"

namespace blockfmt {

// Q5_0 / Q5_1: blocks of 32: float16 d (and for Q5_1 a float16 minimum m), 32 high bits, 16 bytes of
// nibbles (byte j: element j low, element j + 16 high); value = d * (q - 16), or d * q + m.
template <bool kMin>
struct Q5 {
  static constexpr int64_t kBlock = kMin ? 24 : 22, kHead = kMin ? 4 : 2;
  static constexpr int64_t kUnit = 64, kBytes = 2 * kBlock, kCodeBits = 5, kScaleSpan = 32;
  static void scales(const uint8_t* u, float* sc, float* off) {
    for (int b = 0; b < 2; ++b) {
      const float d = half_at(u + kBlock * b);
      sc[2 * b] = sc[2 * b + 1] = d;
      off[2 * b] = off[2 * b + 1] = kMin ? half_at(u + kBlock * b + 2) : -16.f * d;
    }
  }
  static int code(const uint8_t* u, int64_t i) {
    const uint8_t* blk = u + kBlock * (i / 32);
    const int64_t e = i % 32;
    const int nib = e < 16 ? blk[kHead + 4 + e] & 15 : blk[kHead + 4 + e - 16] >> 4;
    return nib | int((u32_at(blk + kHead) >> e) & 1) << 4;
  }
#ifdef TRAMONTANE_X86
  T256 static void scales8(const uint8_t* u, int64_t n, __m256& sc, __m256& off) {
    sc = halves(u, kBlock, 2 * n);
    off = kMin ? halves(u + 2, kBlock, 2 * n) : _mm256_mul_ps(sc, _mm256_set1_ps(-16.f));
  }
  T256 static __m256i codes32(const uint8_t* u, int64_t j) {
    const uint8_t* blk = u + kBlock * j;
    const __m128i v = _mm_loadu_si128((const __m128i*)(blk + kHead + 4));
    const __m256i q = _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1),
                                       _mm256_set1_epi8(15));
    return _mm256_or_si256(q, bit16(u32_at(blk + kHead)));
  }
  T512 static __m512i codes64(const uint8_t* u, int64_t) {
    // 128-bit lanes [block 0's 16 bytes, again, block 1's, again]; their low, high, low, high nibbles
    // are the row's elements in order
    const __m512i both = _mm512_mask_broadcast_i32x4(
        _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(u + kHead + 4))), 0xFF00,
        _mm_loadu_si128((const __m128i*)(u + kBlock + kHead + 4)));
    const __m512i q = nibbles(both, shift_lanes(0xFF00FF00));
    const uint64_t high = uint64_t(u32_at(u + kHead)) | uint64_t(u32_at(u + kBlock + kHead)) << 32;
    return _mm512_mask_add_epi8(q, __mmask64(high), q, _mm512_set1_epi8(16));
  }
#endif
};

}  // namespace blockfmt
