// Q4_K and Q5_K, a GGUF block format (the contract: block_format.h).
#pragma once

#include "block_format.h"

namespace blockfmt {

// The 6-bit scale and minimum of sub-block j (0..7) of a Q4_K / Q5_K super-block's 12 scale bytes.
inline void scale_min_k4(int j, const uint8_t* q, int& sc, int& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}


// Q4_K / Q5_K: super-blocks of 256: float16 d and dmin, 12 bytes of 6-bit scales and minimums for 8
// sub-blocks of 32, (Q5_K: 32 bytes of high bits,) 128 bytes of nibbles: bytes [32c, 32c + 32) hold
// sub-block 2c in their low nibbles and 2c + 1 in their high ones. value = d * sc * q - dmin * m.
template <bool kHigh>
struct QK45 {
  static constexpr int64_t kUnit = 256, kBytes = kHigh ? 176 : 144, kQs = kHigh ? 48 : 16, kCodeBits = kHigh ? 5 : 4, kScaleSpan = 32;
  static void scales(const uint8_t* u, float* sc, float* off) {
    const float d = half_at(u), dmin = half_at(u + 2);
    for (int j = 0; j < 8; ++j) {
      int s, m;
      scale_min_k4(j, u + 4, s, m);
      sc[2 * j] = sc[2 * j + 1] = d * float(s);
      off[2 * j] = off[2 * j + 1] = -(dmin * float(m));
    }
  }
  static int code(const uint8_t* u, int64_t i) {
    const int64_t c = i / 64, l = i % 32;
    const bool hi = i % 64 >= 32;
    const int nib = hi ? u[kQs + 32 * c + l] >> 4 : u[kQs + 32 * c + l] & 15;
    if (!kHigh) return nib;
    return nib | ((u[16 + l] >> (2 * c + hi)) & 1) << 4;
  }
#ifdef TRAMONTANE_X86
  T256 static void scales8(const uint8_t* u, int64_t, __m256& sc, __m256& off) {
    // the unit's first 16 bytes as 32-bit words: (d, dmin), then the 12 scale bytes q0, q1, q2. As bytes
    // per sub-block, 8 scales then 8 minimums (what scale_min_k4 reads): q0 & 0x3f.., then (q2 & 0x0f..)
    // | (q0 >> 6 & 0x03..) << 4, then the same with q1 and q2 >> 4. In vector registers throughout: words
    // built with scalar shifts and inserted one by one made a 4096-wide Q4_K row 3% slower on AVX2 (in
    // cache, one thread, Zen 5).
    const __m128i w = _mm_loadu_si128((const __m128i*)u);
    const __m128i words = _mm_shuffle_epi32(w, _MM_SHUFFLE(3, 2, 3, 1));  // q0, q2, q1, q2
    const __m128i highs = _mm_shuffle_epi32(w, _MM_SHUFFLE(2, 2, 1, 1));  // q0, q0, q1, q1
    const __m128i low = _mm_and_si128(_mm_srlv_epi32(words, _mm_setr_epi32(0, 0, 0, 4)),
                                      _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
    const __m128i high = _mm_and_si128(_mm_srli_epi32(highs, 2), _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
    const __m128i v = _mm_or_si128(low, high);
    const __m128 dd = _mm_cvtph_ps(w);  // d, dmin, ...
    sc = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), _mm256_broadcastss_ps(dd));
    off = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))),
                        _mm256_broadcastss_ps(_mm_xor_ps(_mm_movehdup_ps(dd), _mm_set1_ps(-0.f))));
  }
  T256 static __m256i codes32(const uint8_t* u, int64_t j) {
    // sub-block j: the low (j even) or high nibbles of bytes [32 (j / 2), + 32); Q5_K's fifth bit is bit
    // j of byte l of the 32 high-bit bytes
    const __m256i q = bits_of(load32(u + kQs + 32 * (j / 2)), 4 * int(j % 2), 15);
    if (!kHigh) return q;
    const __m256i bit = _mm256_set1_epi8(char(1 << j));
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(load32(u + 16), bit), bit);
    return _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(16)));
  }
  // codes32(u, j) as 16-bit codes, even elements then odd ones (V256Madd::wide_codes): a byte pair's
  // low nibbles are bits 0-3 and 8-11 of its 16-bit lane, its high nibbles bits 4-7 and 12-15
  T256 static void codes_wide(const uint8_t* u, int64_t j, __m256i out[2]) {
    const __m256i v = load32(u + kQs + 32 * (j / 2)), nib = _mm256_set1_epi16(15);
    if (j % 2 == 0) {
      out[0] = _mm256_and_si256(v, nib);
      out[1] = _mm256_and_si256(_mm256_srli_epi16(v, 8), nib);
    } else {
      out[0] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
      out[1] = _mm256_srli_epi16(v, 12);
    }
    if constexpr (kHigh) {  // the fifth bits: bit j of the 32 high-bit bytes, moved to bit 4
      const __m256i h = load32(u + 16), five = _mm256_set1_epi16(16);
      const __m256i even = j >= 4 ? _mm256_srli_epi16(h, int(j) - 4) : _mm256_slli_epi16(h, 4 - int(j));
      out[0] = _mm256_or_si256(out[0], _mm256_and_si256(even, five));
      out[1] = _mm256_or_si256(out[1], _mm256_and_si256(_mm256_srli_epi16(h, int(j) + 4), five));
    }
  }
  T512 static __m512i codes64(const uint8_t* u, int64_t c) {
    // the 32 bytes twice: low nibbles (sub-block 2c), then high ones (2c + 1)
    const __m512i q = nibbles(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(u + kQs + 32 * c))),
                              shift_lanes(0xFFFF0000));
    if (!kHigh) return q;
    // bit 2c of byte l is element l's fifth bit, bit 2c + 1 element 32 + l's
    const __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(u + 16)));
    const __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8(char(1 << (2 * c))), _mm256_set1_epi8(char(2 << (2 * c))), 1);
    return _mm512_mask_add_epi8(q, _mm512_test_epi8_mask(h, bit), q, _mm512_set1_epi8(16));
  }
#endif
};

}  // namespace blockfmt
