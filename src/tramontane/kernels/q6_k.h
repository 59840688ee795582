// Q6_K, a GGUF block format (the contract: block_format.h).
#pragma once

#include "block_format.h"

namespace blockfmt {

// Q6_K: super-blocks of 256: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales (one per
// 16 elements), float16 d; value = d * scale * (q - 32). Per half n of 128 elements (ql + 64n, qh + 32n):
// element 32p + l takes the low (p = 0, 1) or high (p = 2, 3) nibble of ql[l + 32 (p % 2)] and bits
// 2p, 2p + 1 of qh[l].
struct Q6_K {
  static constexpr int64_t kUnit = 256, kBytes = 210, kCodeBits = 6, kScaleSpan = 16;
  static void scales(const uint8_t* u, float* sc, float* off) {
    const float d = half_at(u + 208);
    for (int g = 0; g < 16; ++g) {
      sc[g] = d * float(int8_t(u[192 + g]));
      off[g] = -32.f * sc[g];
    }
  }
  static int code(const uint8_t* u, int64_t i) {
    const int64_t n = i / 128, p = i % 128 / 32, l = i % 32;
    const uint8_t ql = u[64 * n + l + 32 * (p % 2)];
    return (p < 2 ? ql & 15 : ql >> 4) | ((u[128 + 32 * n + l] >> (2 * p)) & 3) << 4;
  }
#ifdef TRAMONTANE_X86
  T256 static void scales16(const uint8_t* u, int64_t, __m256 sc[2], __m256 off[2]) {
    const __m128i s = _mm_loadu_si128((const __m128i*)(u + 192));
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(uint16_t(u[208] | u[209] << 8)));
    sc[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s)), d);
    sc[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s, 8))), d);
    scaled16(sc, -32.f, off);
  }
  T256 static __m256i codes32(const uint8_t* u, int64_t j) {
    const int n = int(j / 4), p = int(j % 4);
    const __m256i nib = bits_of(load32(u + 64 * n + 32 * (p % 2)), 4 * (p / 2), 15);
    const __m256i high = bits_of(load32(u + 128 + 32 * n), 2 * p, 3);
    return _mm256_or_si256(nib, _mm256_slli_epi16(high, 4));
  }
  T512 static __m512i codes64(const uint8_t* u, int64_t c) {
    const int64_t n = c / 2, part = c % 2;  // part 0: p = 0, 1; part 1: p = 2, 3
    const __m512i ql = _mm512_loadu_si512(u + 64 * n);
    // the 32 bytes of high bits in both halves; element 32p + l's two (bits 2p, 2p + 1 of byte l) shifted to
    // bits 4 and 5 by one shift per half: left 4 and 2 (p = 0, 1), or none and right 2 (p = 2, 3). Three
    // operations where a shift per half, an insert, a mask and a shift took seven: a 14336-wide row went
    // 308 -> 276 ns (in cache, one thread, Zen 5).
    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(u + 128 + 32 * n)));
    const __m512i nib = _mm512_and_si512(part ? _mm512_srli_epi16(ql, 4) : ql, _mm512_set1_epi8(15));
    const __m512i high = part ? _mm512_srlv_epi16(qh, _mm512_maskz_set1_epi16(0xFFFF0000, 2))
                              : _mm512_sllv_epi16(qh, _mm512_mask_set1_epi16(_mm512_set1_epi16(4), 0xFFFF0000, 2));
    return _mm512_ternarylogic_epi32(nib, high, _mm512_set1_epi8(0x30), 0xF8);  // nib | (high & 0x30)
  }
#endif
};

}  // namespace blockfmt
