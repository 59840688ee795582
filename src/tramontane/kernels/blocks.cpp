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
// codes and scales; the dot products, dequantization and dispatch are written once over it.
//
// Products quantize each row of x to int8 in blocks of 32 (scale = max|x| / 127, as int4.cpp does),
// then per 16 elements g: scale_g * scale_x * dot(code, x_q) + offset_g * scale_x * sum(x_q), the dot in
// integers (AVX-512 VNNI's dpbusd multiplies unsigned codes by signed x without saturation). Values
// dequantize exactly as gguf-py's reference does: each product scale * code is exact in fp32, so one
// rounding remains, the same one.
//
// On AMX CPUs, from amx_min_rows<F>() rows of x on, products go through AMX tiles instead (amx.h): each
// weight dequantizes once to bf16, whatever the number of rows of x, and x rounds to bf16 instead of int8.

#include "amx.h"

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
// The float16 values at p, p + stride, ... (n <= 8 of them), each in two lanes: the scales of n blocks
// of 32, one lane per 16 elements. One gather of 32-bit words (each block has bytes to spare after
// its value, so none is read past the row) instead of a value at a time.
T512VNNI inline __m512 halves_by_16(const uint8_t* p, int64_t stride, int64_t n) {
  const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
                                        _mm512_set1_epi32(int(stride)));
  const __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), __mmask16((1u << (2 * n)) - 1), at, p, 1);
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words));
}

// The float16 value at p (F16C), for the vector paths; half_at is the portable one.
T512VNNI inline float half_f16c(const uint8_t* p) { return _cvtsh_ss(uint16_t(p[0] | p[1] << 8)); }

// The nibbles of v's bytes: 16-bit lanes shifted right by `shifts` (0 or 4 each), then masked to 4 bits.
// With v loaded by broadcasts, this splits bytes into low and high nibbles without port-5 shuffles.
T512VNNI inline __m512i nibbles(__m512i v, __m512i shifts) {
  return _mm512_and_si512(_mm512_srlv_epi16(v, shifts), _mm512_set1_epi8(15));
}

// Shift counts for `nibbles`: 4 in the 16-bit lanes set in `high`, 0 in the others.
T512VNNI inline __m512i shift_lanes(__mmask32 high) { return _mm512_maskz_set1_epi16(high, 4); }
#endif

// ---------------------------------------------------------------------------------------- formats
// Each: kUnit elements in kBytes bytes, codes of kCodeBits bits; scales(u, sc, off) fills kUnit / 16
// entries; code(u, i) is element i's code. For the vector kernels: codes512(u, c) elements [64c, 64c + 64) as bytes
// (AVX-512BW), and scales16(u, n, sc, off) the scales and offsets of n units (256 elements at most),
// one lane per 16 elements, read with vector instructions instead of one element at a time.

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
  T512VNNI static void scales16(const uint8_t* u, int64_t n, __m512& sc, __m512& off) {
    sc = halves_by_16(u, 34, 2 * n);
    off = _mm512_mul_ps(sc, _mm512_set1_ps(-128.f));
  }
  T512VNNI static __m512i codes512(const uint8_t* u, int64_t) {
    const __m256i a = _mm256_loadu_si256((const __m256i*)(u + 2)), b = _mm256_loadu_si256((const __m256i*)(u + 36));
    return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1), _mm512_set1_epi8(char(0x80)));
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
  T512VNNI static void scales16(const uint8_t* u, int64_t n, __m512& sc, __m512& off) {
    sc = halves_by_16(u, kBlock, 2 * n);
    off = kMin ? halves_by_16(u + 2, kBlock, 2 * n) : _mm512_mul_ps(sc, _mm512_set1_ps(-16.f));
  }
  T512VNNI static __m512i codes512(const uint8_t* u, int64_t) {
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
  T512VNNI static void scales16(const uint8_t* u, int64_t, __m512& sc, __m512& off) {
    // the 12 bytes as 8 scales then 8 minimums, a byte each (what scale_min_k4 reads, 4 at a time)
    uint32_t q[3], b[4];
    std::memcpy(q, u + 4, 12);
    b[0] = q[0] & 0x3f3f3f3f;
    b[1] = (q[2] & 0x0f0f0f0f) | (((q[0] >> 6) & 0x03030303) << 4);
    b[2] = q[1] & 0x3f3f3f3f;
    b[3] = ((q[2] >> 4) & 0x0f0f0f0f) | (((q[1] >> 6) & 0x03030303) << 4);
    const __m128i v = _mm_loadu_si128((const __m128i*)b);
    const __m128i twice = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);  // a sub-block of 32: 2 lanes
    const __m512 s = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(v, twice)));
    const __m512 m = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(v, _mm_add_epi8(twice, _mm_set1_epi8(8)))));
    sc = _mm512_mul_ps(s, _mm512_set1_ps(half_f16c(u)));
    off = _mm512_mul_ps(m, _mm512_set1_ps(-half_f16c(u + 2)));
  }
  T512VNNI static __m512i codes512(const uint8_t* u, int64_t c) {
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
  T512VNNI static void scales16(const uint8_t* u, int64_t, __m512& sc, __m512& off) {
    const __m512 s = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(u + 192))));
    sc = _mm512_mul_ps(s, _mm512_set1_ps(half_f16c(u + 208)));
    off = _mm512_mul_ps(sc, _mm512_set1_ps(-32.f));
  }
  T512VNNI static __m512i codes512(const uint8_t* u, int64_t c) {
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
// Rows of x as int8 in blocks of 32, with per 16 elements the block's scale and scale * sum(x_q).
struct Act {
  torch::Tensor q, dx, xs;  // int8 [M, K]; float [M, K / 16] twice
  const int8_t* qp;
  const float* dxp;
  const float* xsp;
};

#ifdef TRAMONTANE_X86
T512VNNI void quantize_row_avx512(const float* x, int64_t K, int8_t* q, float* dx, float* xs) {
  const __m512 sign = _mm512_set1_ps(-0.f);
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m512 lo = _mm512_loadu_ps(x + 32 * b), hi = _mm512_loadu_ps(x + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, lo), _mm512_andnot_ps(sign, hi)));
    const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(inv)));
    const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(inv)));
    _mm_storeu_si128((__m128i*)(q + 32 * b), _mm512_cvtsepi32_epi8(qlo));
    _mm_storeu_si128((__m128i*)(q + 32 * b + 16), _mm512_cvtsepi32_epi8(qhi));
    dx[2 * b] = dx[2 * b + 1] = d;
    xs[2 * b] = d * float(_mm512_reduce_add_epi32(qlo));
    xs[2 * b + 1] = d * float(_mm512_reduce_add_epi32(qhi));
  }
}
#endif

void quantize_row_ref(const float* x, int64_t K, int8_t* q, float* dx, float* xs) {
  for (int64_t b = 0; b < K / 32; ++b) {
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[32 * b + i]));
    const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int h = 0; h < 2; ++h) {
      int32_t total = 0;
      for (int i = 16 * h; i < 16 * h + 16; ++i) {
        q[32 * b + i] = int8_t(std::nearbyint(x[32 * b + i] * inv));
        total += q[32 * b + i];
      }
      dx[2 * b + h] = d;
      xs[2 * b + h] = d * float(total);
    }
  }
}

Act quantize_act(const float* x, int64_t M, int64_t K, bool vector) {
  Act a;
  a.q = torch::empty({M, K}, torch::kInt8);
  a.dx = torch::empty({M, K / 16}, torch::kFloat32);
  a.xs = torch::empty({M, K / 16}, torch::kFloat32);
  int8_t* q = a.q.data_ptr<int8_t>();
  float* dx = a.dx.data_ptr<float>();
  float* xs = a.xs.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
#ifdef TRAMONTANE_X86
    if (vector) {
      quantize_row_avx512(x + m * K, K, q + m * K, dx + m * (K / 16), xs + m * (K / 16));
      continue;
    }
#endif
    quantize_row_ref(x + m * K, K, q + m * K, dx + m * (K / 16), xs + m * (K / 16));
  }
  a.qp = q;
  a.dxp = dx;
  a.xsp = xs;
  return a;
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
        const int64_t g0 = m * (K / 16) + u * (F::kUnit / 16);
        for (int64_t g = 0; g < F::kUnit / 16; ++g) {
          int32_t dot = 0;
          for (int i = 0; i < 16; ++i) dot += int32_t(codes[16 * g + i]) * xq[16 * g + i];
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

#ifdef TRAMONTANE_X86
// ---------------------------------------------------------------------------------------- AVX-512 VNNI
// A tile of R weight rows x T rows of x, in steps of 256 elements (16 groups of 16: one K-quant unit, or
// four units of the formats in blocks of 32; a row's last step may be shorter). Per step: each row's
// scales and offsets, one lane per group, read by vector instructions; the scales combined with x's
// into one factor per group (spread over the 4 lanes of the dpbusd sums that cover it by a permute),
// the offsets straight into the accumulators. Per 64 elements: codes decoded once, used for every
// row of x.
template <int R, int T, class F>
T512VNNI inline void tile_vnni(F, const Act& a, int64_t K, const uint8_t* w, float* y, int64_t N, int64_t o,
                               int64_t m0) {
  constexpr int64_t kStep = 256 / F::kUnit;  // units per step
  const int64_t units = K / F::kUnit, row_bytes = units * F::kBytes, K16 = K / 16;
  const NextTile<R> next(w, row_bytes, o, N, m0);
  alignas(64) float gs[R][T][16];
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t u0 = 0; u0 < units; u0 += kStep) {
    const int64_t n = std::min(kStep, units - u0), groups = n * F::kUnit / 16;
    const __mmask16 live = __mmask16((1u << groups) - 1);
    for (int64_t b = (u0 * F::kBytes) & ~int64_t(63); b < (u0 + n) * F::kBytes; b += 64) next.at(b);
    for (int r = 0; r < R; ++r) {
      __m512 s, f;
      F::scales16(w + (o + r) * row_bytes + u0 * F::kBytes, n, s, f);
      for (int t = 0; t < T; ++t) {
        const int64_t g0 = (m0 + t) * K16 + u0 * F::kUnit / 16;
        _mm512_store_ps(gs[r][t], _mm512_mul_ps(s, _mm512_maskz_loadu_ps(live, a.dxp + g0)));
        acc[r][t] = _mm512_fmadd_ps(f, _mm512_maskz_loadu_ps(live, a.xsp + g0), acc[r][t]);
      }
    }
    for (int64_t c = 0; c < groups / 4; ++c) {
      // lane i of a dpbusd sum covers elements 4i..4i+3 of the 64: group 4c + i / 4 of the step
      const __m512i spread = _mm512_add_epi32(_mm512_set1_epi32(int(4 * c)),
                                              _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
      // elements [64c, 64c + 64) of the step: chunk c of a K-quant unit, or the whole unit c of 64
      const int64_t unit = F::kUnit == 64 ? u0 + c : u0, chunk = F::kUnit == 64 ? 0 : c;
      __m512i codes[R];
      for (int r = 0; r < R; ++r) codes[r] = F::codes512(w + (o + r) * row_bytes + unit * F::kBytes, chunk);
      for (int t = 0; t < T; ++t) {
        const __m512i xv = _mm512_loadu_si512(a.qp + (m0 + t) * K + u0 * F::kUnit + 64 * c);
        for (int r = 0; r < R; ++r) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[r], xv);
          const __m512 factor = _mm512_permutexvar_ps(spread, _mm512_load_ps(gs[r][t]));
          acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), factor, acc[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[(m0 + t) * N + o + r] = _mm512_reduce_add_ps(acc[r][t]);
}

template <class F>
T512VNNI void rows_vnni(const Act& a, int64_t M, int64_t K, const uint8_t* w, float* y, int64_t N, int64_t begin,
                        int64_t end) {
  const F fmt{};
  walk(M, begin, end, DISPATCH_TILE(tile_vnni, fmt, a, K, w, y, N));
}

template <class F>
T512VNNI void dequantize_rows_vnni(const uint8_t* w, int64_t K, float* out, int64_t begin, int64_t end) {
  const int64_t units = K / F::kUnit, row_bytes = units * F::kBytes;
  alignas(64) float sc[16], off[16];
  alignas(64) uint8_t codes[64];
  for (int64_t o = begin; o < end; ++o)
    for (int64_t u = 0; u < units; ++u) {
      const uint8_t* unit = w + o * row_bytes + u * F::kBytes;
      F::scales(unit, sc, off);
      for (int64_t c = 0; c < F::kUnit / 64; ++c) {
        _mm512_store_si512(codes, F::codes512(unit, c));
        for (int p = 0; p < 4; ++p) {  // 16 elements: one scale group
          const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i*)(codes + 16 * p))));
          const int64_t g = 4 * c + p;
          _mm512_storeu_ps(out + o * K + u * F::kUnit + 16 * g,
                           _mm512_fmadd_ps(v, _mm512_set1_ps(sc[g]), _mm512_set1_ps(off[g])));
        }
      }
    }
}
#endif  // TRAMONTANE_X86

// ---------------------------------------------------------------------------------------- AMX
#ifdef TRAMONTANE_AMX
// A format's rows for the tile loop of amx.h: at the start of each unit, the scales and offsets of every
// row of a 16-row group; each block of 32 then decodes straight into its A tile, as dequantize_rows_vnni
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
      __m512 scv, offv;
      F::scales16(w + (o + r) * row_bytes + u * F::kBytes, 1, scv, offv);
      _mm512_store_ps(sc[g][r], scv);
      _mm512_store_ps(off[g][r], offv);
    }
  }

  TAMX void decode(int g, int64_t o, int64_t rows, int64_t b, uint16_t* dst) const {
    const int64_t u = b / (F::kUnit / 32), at = b % (F::kUnit / 32) * 32;  // the block's first element in its unit
    const int64_t c = at / 64, s16 = at / 16;
    for (int64_t r = 0; r < 16; ++r) {
      if (r >= rows) {
        _mm512_store_si512(dst + r * 32, _mm512_setzero_si512());
        continue;
      }
      const __m512i codes = F::codes512(w + (o + r) * row_bytes + u * F::kBytes, c);
      const __m256i q = at % 64 ? _mm512_extracti64x4_epi64(codes, 1) : _mm512_castsi512_si256(codes);
      if constexpr (F::kCodeBits <= 5) {
        // codes of at most 5 bits under one scale per block of 32 (both of its groups of 16 alike): the
        // block's 32 possible values, bf16(j * scale + offset), as a table that one permute reads
        const __m512 j = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 d = _mm512_set1_ps(sc[g][r][s16]), base = _mm512_set1_ps(off[g][r][s16]);
        const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(
            _mm512_fmadd_ps(_mm512_add_ps(j, _mm512_set1_ps(16.f)), d, base), _mm512_fmadd_ps(j, d, base));
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

bool use_vnni() { return current_isa() == Isa::kAvx512 && has_avx512_vnni(); }

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
    const bool vnni = use_vnni();
    const Act a = quantize_act(x.data_ptr<float>(), M, K, vnni);
    const uint8_t* wp = w.data_ptr<uint8_t>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, grain(N), [&](int64_t begin, int64_t end) {
#ifdef TRAMONTANE_X86
      if (vnni) return rows_vnni<F>(a, M, K, wp, yp, N, begin, end);
#endif
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
    const bool vnni = use_vnni();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
#ifdef TRAMONTANE_X86
      if (vnni) return dequantize_rows_vnni<F>(wp, K, op, begin, end);
#endif
      dequantize_rows_ref<F>(wp, K, op, begin, end);
    });
    return out;
  });
}
