// GGUF block formats kept as the file stores them: Q8_0, Q5_0, Q5_1 and the K-quants Q4_K, Q5_K, Q6_K.
//
// A weight row is the file's bytes, unchanged: a run of units of kUnit elements (a K-quant super-block
// of 256, or two 32-element blocks). Every format reads as the same two things, which is all a kernel
// needs (learned from ggml-cpu's quants.c; written anew here):
//   - codes: one unsigned byte per element, in the row's order (the 4, 5, 6 or 8 bits of the format,
//     made unsigned: Q8_0's int8 plus 128, Q6_K's 6 bits as stored);
//   - per 16 elements a scale and an offset: value = scale * code + offset (offset folds in a format's
//     minimum, Q6_K's -32 or Q8_0's -128, so codes never need a sign).
// So a new format is one small struct below: its unit size, its bytes per unit, and how to read its
// codes and scales (one element at a time for the portable path, 32 codes or a unit's scales at a time
// with AVX2 instructions for the vector ones); the dot products, dequantization and dispatch are written
// once over it (blocks_tiles.h, compiled once per instruction set).
//
// Products split each row of x into two int8 parts per element in blocks of 32 (split_ref, common.h: x =
// d (q + r / 256), d = max|x| / 127), then per 16 elements g: scale_g * d / 256 * ((dot(code, q) << 8) +
// dot(code, r)) + offset_g * sum(x), the dots in integers (VNNI's dpbusd multiplies unsigned codes by
// signed x without saturation; AVX2's maddubs does for codes up to 6 bits, and takes wider ones as two
// nibbles). Values
// dequantize exactly as gguf-py's reference does: each product scale * code is exact in fp32, so one
// rounding remains, the same one.
//
// On AMX CPUs, from amx_min_rows<F>() rows of x on, products go through AMX tiles instead (amx.h): each
// weight dequantizes once to bf16, whatever the number of rows of x, and x rounds to bf16 instead of int8.

#include "amx.h"
#include "simd.h"

#include <tuple>
#include <vector>

namespace {

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

#ifdef TRAMONTANE_X86
// The float16 values at p, p + stride, ... (n <= 8 of them) as fp32, each twice (a block of 32 is two
// groups of 16): lanes [2i, 2i + 1] of sc hold value i; lanes from 2n on are zero. One gather of 32-bit
// words (each block has bytes to spare after its value, so none is read past the row), packed to 16 bits.
T256 inline void halves_twice(const uint8_t* p, int64_t stride, int64_t n, __m256 sc[2]) {
  const __m256i at = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(int(stride)));
  const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i words = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int*)p, at, live, 1);
  const __m256i low = _mm256_shuffle_epi8(  // each 128-bit lane's four low halves into its low 8 bytes
      words, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9, 12, 13, -1,
                              -1, -1, -1, -1, -1, -1, -1));
  const __m256 v = _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(low, 0x08)));  // qwords 0, 2
  sc[0] = _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  sc[1] = _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7));
}

// dst = src * k, 16 floats in two registers each
T256 inline void scaled16(const __m256 src[2], float k, __m256 dst[2]) {
  dst[0] = _mm256_mul_ps(src[0], _mm256_set1_ps(k));
  dst[1] = _mm256_mul_ps(src[1], _mm256_set1_ps(k));
}

// 32 bytes: 16 where bit i of the 32-bit word `bits` is set (byte i), else 0.
T256 inline __m256i bit16(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(  // byte i = byte i / 8 of bits
      _mm256_set1_epi32(int(bits)), _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(16));
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

// ---------------------------------------------------------------------------------------- formats
// Each: kUnit elements in kBytes bytes, codes of kCodeBits bits; scales(u, sc, off) fills kUnit / 16
// entries; code(u, i) is element i's code. For the vector kernels: codes32(u, j), elements
// [32j, 32j + 32) of the unit as bytes, and scales16(u, n, sc, off), the scales and offsets of n units
// (256 elements at most), 16 of each (zero past the units) in two registers of 8. Optionally codes64(u, j),
// elements [64j, 64j + 64) with AVX-512 instructions, where that is faster than two codes32: the
// AVX-512 kernels then use it.

struct Q8_0 {  // blocks of 32: float16 d, 32 x int8; value = d * q
  static constexpr int64_t kUnit = 64, kBytes = 68, kCodeBits = 8;
  static void scales(const uint8_t* u, float* sc, float* off) {
    for (int b = 0; b < 2; ++b) {
      const float d = half_at(u + 34 * b);
      sc[2 * b] = sc[2 * b + 1] = d;
      off[2 * b] = off[2 * b + 1] = -128.f * d;
    }
  }
  static int code(const uint8_t* u, int64_t i) { return (u[34 * (i / 32) + 2 + i % 32] ^ 0x80); }
#ifdef TRAMONTANE_X86
  T256 static void scales16(const uint8_t* u, int64_t n, __m256 sc[2], __m256 off[2]) {
    halves_twice(u, 34, 2 * n, sc);
    scaled16(sc, -128.f, off);
  }
  T256 static __m256i codes32(const uint8_t* u, int64_t j) {
    return _mm256_xor_si256(load32(u + 34 * j + 2), _mm256_set1_epi8(char(0x80)));
  }
#endif
};

// Q5_0 / Q5_1: blocks of 32: float16 d (and for Q5_1 a float16 minimum m), 32 high bits, 16 bytes of
// nibbles (byte j: element j low, element j + 16 high); value = d * (q - 16), or d * q + m.
template <bool kMin>
struct Q5 {
  static constexpr int64_t kBlock = kMin ? 24 : 22, kHead = kMin ? 4 : 2;
  static constexpr int64_t kUnit = 64, kBytes = 2 * kBlock, kCodeBits = 5;
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
  T256 static void scales16(const uint8_t* u, int64_t n, __m256 sc[2], __m256 off[2]) {
    halves_twice(u, kBlock, 2 * n, sc);
    if (kMin) halves_twice(u + 2, kBlock, 2 * n, off);
    else scaled16(sc, -16.f, off);
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

// Q4_K / Q5_K: super-blocks of 256: float16 d and dmin, 12 bytes of 6-bit scales and minimums for 8
// sub-blocks of 32, (Q5_K: 32 bytes of high bits,) 128 bytes of nibbles: bytes [32c, 32c + 32) hold
// sub-block 2c in their low nibbles and 2c + 1 in their high ones. value = d * sc * q - dmin * m.
template <bool kHigh>
struct QK45 {
  static constexpr int64_t kUnit = 256, kBytes = kHigh ? 176 : 144, kQs = kHigh ? 48 : 16, kCodeBits = kHigh ? 5 : 4;
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
  T256 static void scales16(const uint8_t* u, int64_t, __m256 sc[2], __m256 off[2]) {
    // the 12 bytes as 8 scales then 8 minimums, a byte each (what scale_min_k4 reads, 4 at a time)
    // (built in a register: four 32-bit stores read back as one load would stall it)
    uint32_t q[3];
    std::memcpy(q, u + 4, 12);
    const __m128i v = _mm_setr_epi32(int(q[0] & 0x3f3f3f3f), int((q[2] & 0x0f0f0f0f) | (((q[0] >> 6) & 0x03030303) << 4)),
                                     int(q[1] & 0x3f3f3f3f),
                                     int(((q[2] >> 4) & 0x0f0f0f0f) | (((q[1] >> 6) & 0x03030303) << 4)));
    const __m128i twice = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);  // a sub-block of 32: 2 groups
    const float d = _cvtsh_ss(uint16_t(u[0] | u[1] << 8)), dmin = _cvtsh_ss(uint16_t(u[2] | u[3] << 8));
    for (int half = 0; half < 2; ++half) {  // scales, then minimums
      const __m128i bytes = _mm_shuffle_epi8(v, _mm_add_epi8(twice, _mm_set1_epi8(char(8 * half))));
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)));
      __m256* dst = half ? off : sc;
      const __m256 k = _mm256_set1_ps(half ? -dmin : d);
      dst[0] = _mm256_mul_ps(lo, k);
      dst[1] = _mm256_mul_ps(hi, k);
    }
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

// Q6_K: super-blocks of 256: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales (one per
// 16 elements), float16 d; value = d * scale * (q - 32). Per half n of 128 elements (ql + 64n, qh + 32n):
// element 32p + l takes the low (p = 0, 1) or high (p = 2, 3) nibble of ql[l + 32 (p % 2)] and bits
// 2p, 2p + 1 of qh[l].
struct Q6_K {
  static constexpr int64_t kUnit = 256, kBytes = 210, kCodeBits = 6;
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
    const __m256i qh = _mm256_loadu_si256((const __m256i*)(u + 128 + 32 * n));
    const __m512i nib = _mm512_and_si512(part ? _mm512_srli_epi16(ql, 4) : ql, _mm512_set1_epi8(15));
    const __m512i high = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(qh, int(4 * part))),
                                            _mm256_srli_epi16(qh, int(4 * part + 2)), 1);
    return _mm512_or_si512(nib, _mm512_slli_epi16(_mm512_and_si512(high, _mm512_set1_epi8(3)), 4));
  }
#endif
};

// ---------------------------------------------------------------------------------------- activations
// Rows of x in two int8 parts per element (split_ref, common.h), with per 16 elements the block's d / 256
// and x's sum as the parts hold it.
struct Act {
  torch::Tensor q, r, dx, xs;  // int8 [M, K] twice; float [M, K / 16] twice
  const int8_t* qp;
  const int8_t* rp;
  const float* dxp;
  const float* xsp;
};

void quantize_row_ref(const float* x, int64_t K, int8_t* q, int8_t* r, float* dx, float* xs) {
  for (int64_t b = 0; b < K / 32; ++b) {
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[32 * b + i]));
    const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int h = 0; h < 2; ++h) {
      int32_t total = 0;
      for (int i = 16 * h; i < 16 * h + 16; ++i) {
        split_ref(x[32 * b + i], inv, q[32 * b + i], r[32 * b + i]);
        total += 256 * q[32 * b + i] + r[32 * b + i];
      }
      dx[2 * b + h] = d / 256.f;
      xs[2 * b + h] = d / 256.f * float(total);
    }
  }
}

// ---------------------------------------------------------------------------------------- portable
template <class F>
void rows_ref(const Act& a, int64_t M, int64_t K, const uint8_t* w, float* y, int64_t N, int64_t begin, int64_t end) {
  const int64_t units = K / F::kUnit, row_bytes = units * F::kBytes;
  float sc[16], off[16];
  uint8_t codes[F::kUnit];
  for (int64_t o = begin; o < end; ++o) {
    std::vector<float> acc(M, 0.f);
    for (int64_t u = 0; u < units; ++u) {
      const uint8_t* unit = w + o * row_bytes + u * F::kBytes;
      F::scales(unit, sc, off);
      for (int64_t i = 0; i < F::kUnit; ++i) codes[i] = uint8_t(F::code(unit, i));
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xq = a.qp + m * K + u * F::kUnit;
        const int8_t* xr = a.rp + m * K + u * F::kUnit;
        const int64_t g0 = m * (K / 16) + u * (F::kUnit / 16);
        for (int64_t g = 0; g < F::kUnit / 16; ++g) {
          int32_t dot = 0;
          for (int i = 0; i < 16; ++i) dot += int32_t(codes[16 * g + i]) * (256 * xq[16 * g + i] + xr[16 * g + i]);
          acc[m] += sc[g] * a.dxp[g0 + g] * float(dot) + off[g] * a.xsp[g0 + g];
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) y[m * N + o] = acc[m];
  }
}

template <class F>
void dequantize_rows_ref(const uint8_t* w, int64_t K, float* out, int64_t begin, int64_t end) {
  const int64_t units = K / F::kUnit, row_bytes = units * F::kBytes;
  float sc[16], off[16];
  for (int64_t o = begin; o < end; ++o)
    for (int64_t u = 0; u < units; ++u) {
      const uint8_t* unit = w + o * row_bytes + u * F::kBytes;
      F::scales(unit, sc, off);
      float* dst = out + o * K + u * F::kUnit;
      for (int64_t i = 0; i < F::kUnit; ++i) dst[i] = sc[i / 16] * float(F::code(unit, i)) + off[i / 16];
    }
}

// ---------------------------------------------------------------------------------------- vector
#define TRAMONTANE_TILES "blocks_tiles.h"
#include "per_isa.h"

Act quantize_act(const float* x, int64_t M, int64_t K) {
  Act a;
  a.q = torch::empty({M, K}, torch::kInt8);
  a.r = torch::empty({M, K}, torch::kInt8);
  a.dx = torch::empty({M, K / 16}, torch::kFloat32);
  a.xs = torch::empty({M, K / 16}, torch::kFloat32);
  int8_t* q = a.q.data_ptr<int8_t>();
  int8_t* r = a.r.data_ptr<int8_t>();
  float* dx = a.dx.data_ptr<float>();
  float* xs = a.xs.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    int8_t *qm = q + m * K, *rm = r + m * K;
    float *dxm = dx + m * (K / 16), *xsm = xs + m * (K / 16);
    BY_ISA(quantize_row(xm, K, qm, rm, dxm, xsm), continue);
    quantize_row_ref(xm, K, qm, rm, dxm, xsm);
  }
  a.qp = q;
  a.rp = r;
  a.dxp = dx;
  a.xsp = xs;
  return a;
}

// ---------------------------------------------------------------------------------------- AMX
#ifdef TRAMONTANE_AMX
// A format's rows for the tile loop of amx.h: at the start of each unit, the scales and offsets of every
// row of a 16-row group; each block of 32 then decodes straight into its A tile, as dequantize_rows
// computes the values, rounded to bf16 (nearest even). Values come in the row's order (k_of(t) = t).
template <class F>
struct BlockRows {
  const uint8_t* w;
  int64_t K, row_bytes;
  alignas(64) float sc[2][16][16], off[2][16][16];  // [group][row][16 elements of the unit being decoded]

  static int64_t k_of(int64_t t) { return t; }

  TAMX void prepare(int g, int64_t o, int64_t rows, int64_t b) {
    if (b % (F::kUnit / 32)) return;
    const int64_t u = b / (F::kUnit / 32);
    for (int64_t r = 0; r < rows; ++r) {
      __m256 s[2], f[2];
      F::scales16(w + (o + r) * row_bytes + u * F::kBytes, 1, s, f);
      for (int i = 0; i < 2; ++i) {
        _mm256_store_ps(sc[g][r] + 8 * i, s[i]);
        _mm256_store_ps(off[g][r] + 8 * i, f[i]);
      }
    }
  }

  TAMX void decode(int g, int64_t o, int64_t rows, int64_t b, uint16_t* dst) const {
    const int64_t u = b / (F::kUnit / 32), j = b % (F::kUnit / 32);  // block j of 32 in its unit
    const int64_t s16 = 2 * j;
    for (int64_t r = 0; r < 16; ++r) {
      if (r >= rows) {
        _mm512_store_si512(dst + r * 32, _mm512_setzero_si512());
        continue;
      }
      const __m256i q = F::codes32(w + (o + r) * row_bytes + u * F::kBytes, j);
      if constexpr (F::kCodeBits <= 5) {
        // codes of at most 5 bits under one scale per block of 32 (both of its groups of 16 alike): the
        // block's 32 possible values, bf16(j * scale + offset), as a table that one permute reads
        const __m512 k = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 d = _mm512_set1_ps(sc[g][r][s16]), base = _mm512_set1_ps(off[g][r][s16]);
        const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(
            _mm512_fmadd_ps(_mm512_add_ps(k, _mm512_set1_ps(16.f)), d, base), _mm512_fmadd_ps(k, d, base));
        _mm512_store_si512(dst + r * 32, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(q), table));
        continue;
      }
      const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(q))),
                                        _mm512_set1_ps(sc[g][r][s16]), _mm512_set1_ps(off[g][r][s16]));
      const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(q, 1))),
                                        _mm512_set1_ps(sc[g][r][s16 + 1]), _mm512_set1_ps(off[g][r][s16 + 1]));
      _mm512_store_si512(dst + r * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }

  void prefetch_side(int64_t, int64_t) const {}

  float row_factor(int64_t) const { return 1.f; }
};
#endif

// ---------------------------------------------------------------------------------------- dispatch
// ggml's type numbers, as GGUF files store them.
enum Kind : int64_t { kQ8_0 = 8, kQ5_0 = 6, kQ5_1 = 7, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

template <class Fn>
auto with_format(int64_t kind, Fn fn) {
  switch (kind) {
    case kQ8_0: return fn(Q8_0{});
    case kQ5_0: return fn(Q5<false>{});
    case kQ5_1: return fn(Q5<true>{});
    case kQ4_K: return fn(QK45<false>{});
    case kQ5_K: return fn(QK45<true>{});
    case kQ6_K: return fn(Q6_K{});
    default: break;
  }
  TORCH_CHECK(false, "block format: unsupported ggml type ", kind);
  __builtin_unreachable();
}

// From this many rows of x on, AMX tiles beat the integer kernel: dequantizing every weight to bf16 costs
// what that many rows of dot products do. 4096 x 4096, 2 threads, Xeon with AMX, tiles against VNNI:
// Q4_K 1.15 / 1.21 ms at 6 rows, 1.13 / 1.50 at 8; Q6_K 1.25 / 1.34 at 6; Q8_0 1.41 / 1.39 at 8, 1.39 /
// 1.70 at 9 (a gather of each block's scale, where K-quant units read theirs with a few vector loads).
template <class F>
constexpr int64_t amx_min_rows() {
  return F::kUnit == 256 ? 6 : 9;
}

template <class F>
int64_t check_blocks(F, const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8 && w.is_contiguous() && w.device().is_cpu(),
              "w must be a contiguous uint8 CPU tensor [N, row bytes]");
  TORCH_CHECK(w.size(1) % F::kBytes == 0, "row bytes ", w.size(1), " are not whole units of ", F::kBytes);
  return w.size(1) / F::kBytes * F::kUnit;  // K
}

}  // namespace

std::tuple<int64_t, int64_t> block_unit(int64_t kind) {
  return with_format(kind, [](auto f) { return std::make_tuple(decltype(f)::kUnit, decltype(f)::kBytes); });
}

int64_t block_amx_min_rows(int64_t kind) {
  return with_format(kind, [](auto f) { return amx_min_rows<decltype(f)>(); });
}

torch::Tensor block_linear(torch::Tensor x, torch::Tensor w, int64_t kind) {
  return with_format(kind, [&](auto f) {
    using F = decltype(f);
    const int64_t K = check_blocks(f, w), N = w.size(0), M = x.size(0);
    check_x(x, K);
    auto y = torch::empty({M, N}, x.options());
#ifdef TRAMONTANE_AMX
    if (M >= amx_min_rows<F>() && amx_in_use()) {
      amx::run(x.data_ptr<float>(), M, BlockRows<F>{w.data_ptr<uint8_t>(), K, w.size(1), {}, {}}, y.data_ptr<float>(), N);
      return y;
    }
#endif
    const Act a = quantize_act(x.data_ptr<float>(), M, K);
    const uint8_t* wp = w.data_ptr<uint8_t>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, grain(N), [&](int64_t begin, int64_t end) {
      BY_ISA(block_rows<F>(a, M, K, wp, yp, N, begin, end), return);
      rows_ref<F>(a, M, K, wp, yp, N, begin, end);
    });
    return y;
  });
}

torch::Tensor block_dequantize(torch::Tensor w, int64_t kind) {
  return with_format(kind, [&](auto f) {
    using F = decltype(f);
    const int64_t K = check_blocks(f, w), N = w.size(0);
    auto out = torch::empty({N, K}, torch::dtype(torch::kFloat32));
    const uint8_t* wp = w.data_ptr<uint8_t>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      BY_ISA(dequantize_rows<F>(wp, K, op, begin, end), return);
      dequantize_rows_ref<F>(wp, K, op, begin, end);
    });
    return out;
  });
}
