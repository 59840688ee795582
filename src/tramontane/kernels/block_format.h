// What every GGUF block format (blocks.cpp) is and shares. A format is one small struct in its own header
// (q8_0.h, q5.h, qk45.h, q6_k.h): kUnit elements in kBytes bytes, codes of kCodeBits bits, one scale and
// one offset per kScaleSpan elements (16 or 32); scales(u, sc, off) fills kUnit / 16 entries (a scale of
// 32 elements twice); code(u, i) is element i's code. For the vector kernels: codes32(u, j), elements
// [32j, 32j + 32) of the unit as bytes; and the scales and offsets of n units (256 elements at most, zero
// past the units): with kScaleSpan 16, scales16(u, n, sc, off), 16 of each in two registers of 8; with
// kScaleSpan 32, scales8(u, n, sc, off), 8 of each in one register (scales16_of gives either as 16).
// Optionally codes64(u, j), elements [64j, 64j + 64) with AVX-512 instructions, where that is faster than
// two codes32: the AVX-512 kernels then use it; and codes_wide(u, j, out), codes32's as 16-bit codes, even
// elements then odd ones, where that is cheaper than splitting codes32's bytes: AVX2 alone then uses it.
// A new format: a header with its struct, its ggml type number in blocks.cpp's `with_format`, and its
// rows in the tests (tests/test_blocks.py): the kernels, dequantization and dispatch are written once.
#pragma once

#include "common.h"

namespace blockfmt {

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return float(c10::Half(h, c10::Half::from_bits()));
}

inline uint32_t u32_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}


#ifdef TRAMONTANE_X86
// The float16 values at p, p + stride, ... (n <= 8 of them) as fp32, zero from lane n on. Built in a
// register from scalar loads: a gather of 32-bit words took 15-30% of the time of a Q5_0 or Q8_0 product
// on Zen 5 (in cache, one thread; AMD runs gathers in microcode, and the Downfall fix slowed Intel's), and
// halves stored to a buffer and read back as one vector stall on the store forwarding.
T256 inline __m256 halves(const uint8_t* p, int64_t stride, int64_t n) {
  const auto at = [&](int64_t i) -> short {
    uint16_t v = 0;
    if (i < n) std::memcpy(&v, p + i * stride, 2);
    return short(v);
  };
  return _mm256_cvtph_ps(_mm_setr_epi16(at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7)));
}

// 8 values, each twice: lanes [2i, 2i + 1] of out hold v's lane i (a scale of 32 as two groups of 16)
T256 inline void twice(__m256 v, __m256 out[2]) {
  out[0] = _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  out[1] = _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7));
}

// The even lanes of 16 floats (a then b), in order
T256 inline __m256 evens(__m256 a, __m256 b) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
}

// The sums of lanes 2i and 2i + 1 of 16 floats (a then b), in order
T256 inline __m256 pair_sums(__m256 a, __m256 b) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_hadd_ps(a, b)), 0xD8));
}

// A format's scales and offsets per 16 elements, whichever span it stores them in
template <class Fm>
T256 inline void scales16_of(const uint8_t* u, int64_t n, __m256 sc[2], __m256 off[2]) {
  if constexpr (Fm::kScaleSpan == 32) {
    __m256 s, f;
    Fm::scales8(u, n, s, f);
    twice(s, sc);
    twice(f, off);
  } else {
    Fm::scales16(u, n, sc, off);
  }
}

// dst = src * k, 16 floats in two registers each
T256 inline void scaled16(const __m256 src[2], float k, __m256 dst[2]) {
  dst[0] = _mm256_mul_ps(src[0], _mm256_set1_ps(k));
  dst[1] = _mm256_mul_ps(src[1], _mm256_set1_ps(k));
}

// Bytes of v shifted right by `shift` bits (within 16-bit lanes), masked to `mask`.
T256 inline __m256i bits_of(__m256i v, int shift, int mask) {
  return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8(char(mask)));
}

T256 inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }

// For a format's optional codes64 (AVX-512 only): the nibbles of v's bytes, 16-bit lanes shifted right
// by `shifts` (0 or 4 each), then masked to 4 bits. With v loaded by broadcasts, this splits bytes into
// low and high nibbles without port-5 shuffles.
T512 inline __m512i nibbles(__m512i v, __m512i shifts) {
  return _mm512_and_si512(_mm512_srlv_epi16(v, shifts), _mm512_set1_epi8(15));
}

// Shift counts for `nibbles`: 4 in the 16-bit lanes set in `high`, 0 in the others.
T512 inline __m512i shift_lanes(__mmask32 high) { return _mm512_maskz_set1_epi16(high, 4); }
#endif

}  // namespace blockfmt
