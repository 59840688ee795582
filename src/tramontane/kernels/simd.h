// The vector widths the kernels are written over, so that a tile is written once (ggml-cpu's
// simd-mappings.h and Highway's per-target namespaces, done with C++ types).
//
// V512 (AVX-512 F/BW/VL/DQ with VNNI) and V256Vnni / V256Madd (AVX2, FMA, F16C; with AVX-VNNI or
// without) give the same operations on their own registers: kLanes floats or int32 sums, kBytes int8 or
// uint8 elements. A tile header (blocks_tiles.h, int4_tiles.h, dense_tiles.h) uses `V::` only, and
// per_isa.h compiles it once per instruction set, each copy in its own namespace under its own target,
// so no code compiled for one instruction set can run on a CPU that has only another. (The per-target
// regions are GCC pragmas: a compiler without them, clang for one, fails to build the kernels, and the
// layers then fall back to PyTorch with a warning.)
#pragma once

#include "common.h"

#include <type_traits>

#ifdef TRAMONTANE_X86
#define VEC_INLINE __attribute__((always_inline)) inline
#define T512OPS __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))
#define T256OPS __attribute__((target("avx2,fma,f16c")))
#define T256VNNIOPS __attribute__((target("avx2,fma,f16c,avxvnni")))

template <class, class = void>
struct HasCodes64 : std::false_type {};
template <class Fm>
struct HasCodes64<Fm, std::void_t<decltype(&Fm::codes64)>> : std::true_type {};
template <class, class = void>
struct HasCodesWide : std::false_type {};
template <class Fm>
struct HasCodesWide<Fm, std::void_t<decltype(&Fm::codes_wide)>> : std::true_type {};

struct V512 {
  using F = __m512;
  using I = __m512i;
  static constexpr int kLanes = 16, kBytes = 64;
  // Whether the integer tiles take two-part activations whole, as int16 (V256Madd says why); where not,
  // dot_wide, widen32 and wide_codes are declared only, for the branches that never run
  static constexpr bool kWide = false;
  static I dot_wide(const I a[2], const I x[2]);
  static void widen32(const int8_t* q, const int8_t* r, int16_t* w);
  template <class Fm>
  static void wide_codes(const uint8_t* unit, int64_t j, I out[2]);

  T512OPS VEC_INLINE static F zero() { return _mm512_setzero_ps(); }
  T512OPS VEC_INLINE static F set1(float v) { return _mm512_set1_ps(v); }
  T512OPS VEC_INLINE static F load(const float* p) { return _mm512_loadu_ps(p); }
  // kLanes float16 or bfloat16 values (their bits) at p as floats
  T512OPS VEC_INLINE static F load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  T512OPS VEC_INLINE static F load_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  T512OPS VEC_INLINE static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  // lanes [0, n) from p, the others zero (nothing read past p + n)
  T512OPS VEC_INLINE static F load_partial(const float* p, int64_t n) {
    if (n >= kLanes) return _mm512_loadu_ps(p);
    return _mm512_maskz_loadu_ps(__mmask16((1u << std::max<int64_t>(n, 0)) - 1), p);
  }
  // vector i of 16 floats held as two 256-bit halves (the formats' scales come so)
  T512OPS VEC_INLINE static F of16(const __m256 h[2], int) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(h[0]), h[1], 1);
  }
  T512OPS VEC_INLINE static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  T512OPS VEC_INLINE static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  T512OPS VEC_INLINE static F fmsub(F a, F b, F c) { return _mm512_fmsub_ps(a, b, c); }  // a b - c, one rounding
  T512OPS VEC_INLINE static F abs_max(F m, F v) { return _mm512_max_ps(m, _mm512_andnot_ps(_mm512_set1_ps(-0.f), v)); }
  T512OPS VEC_INLINE static float sum(F v) { return _mm512_reduce_add_ps(v); }
  // the sums of a, b, c, d in the four lanes of the result (a transposing tree: 4 sums for the shuffles of 1)
  T512OPS VEC_INLINE static __m128 sum4(F a, F b, F c, F d) {
    const F ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // per 128: a b a b
    const F cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const F abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));  // a b c d
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
  }
  T512OPS VEC_INLINE static F max(F a, F b) { return _mm512_max_ps(a, b); }
  // 8 floats in the low lanes, zero above
  T512OPS VEC_INLINE static F of8(__m256 v) { return _mm512_zextps256_ps512(v); }
  T512OPS VEC_INLINE static F add(F a, F b) { return _mm512_add_ps(a, b); }
  // y where x >= lo, else 0
  T512OPS VEC_INLINE static F zero_below(F y, F x, float lo) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(lo), _CMP_GE_OQ), y);
  }
  // 2^n as a float, for n in the normal range
  T512OPS VEC_INLINE static F pow2(I n) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23)); }
  T512OPS VEC_INLINE static F clamp(F x, float lo, float hi) {
    return _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
  }
  T512OPS VEC_INLINE static float max(F v) { return _mm512_reduce_max_ps(v); }
  // kLanes int8 at p as floats
  T512OPS VEC_INLINE static F int8_floats(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  }

  // kLanes uint8 at p as floats
  T512OPS VEC_INLINE static F uint8_floats(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)));
  }

  T512OPS VEC_INLINE static I zero_int() { return _mm512_setzero_si512(); }
  T512OPS VEC_INLINE static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  T512OPS VEC_INLINE static I times256(I a) { return _mm512_slli_epi32(a, 8); }
  T512OPS VEC_INLINE static I clamp_int8(I a) {
    return _mm512_min_epi32(_mm512_max_epi32(a, _mm512_set1_epi32(-128)), _mm512_set1_epi32(127));
  }
  T512OPS VEC_INLINE static I loadi(const void* p) { return _mm512_loadu_si512(p); }
  T512OPS VEC_INLINE static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  // rounded to nearest even (the default rounding mode), as std::nearbyint rounds
  T512OPS VEC_INLINE static I round(F v) { return _mm512_cvtps_epi32(v); }
  T512OPS VEC_INLINE static int32_t sum(I v) { return _mm512_reduce_add_epi32(v); }
  // kLanes int32 of int8 range stored as int8 at p
  T512OPS VEC_INLINE static void store_int8(int8_t* p, I v) { _mm_storeu_si128((__m128i*)p, _mm512_cvtsepi32_epi8(v)); }

  // acc + the sums of each 4 products of unsigned a and signed b (codes of kBits bits: any up to 8)
  template <int kBits>
  T512OPS VEC_INLINE static I dot(I acc, I a, I b) { return _mm512_dpbusd_epi32(acc, a, b); }
  // acc + dot(a0, b0) + dot(a1, b1) (V256Madd says why it is one operation)
  template <int kBits>
  T512OPS VEC_INLINE static I dot_pair(I acc, I a0, I b0, I a1, I b1) {
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, a0, b0), a1, b1);
  }

  // elements [64j, 64j + 64) of a unit of format Fm: its own codes64 where it has one, else its two
  // 32-byte pieces
  template <class Fm>
  T512OPS VEC_INLINE static I codes(const uint8_t* unit, int64_t j) {
    if constexpr (HasCodes64<Fm>::value) return Fm::codes64(unit, j);
    else return _mm512_inserti64x4(_mm512_castsi256_si512(Fm::codes32(unit, 2 * j)), Fm::codes32(unit, 2 * j + 1), 1);
  }

  // Per dot lane (4 elements), the factor of its group of 16 in chunk c: g[4c + lane / 4]; where g holds
  // one factor per 32 elements (kSpan 32), g[2c + lane / 8].
  template <int kSpan>
  T512OPS VEC_INLINE static F by_group(const float* g, int64_t c) {
    // one permute of the factors, where broadcasts and an insert took three shuffles
    if constexpr (kSpan == 32) {
      const __m512i at = _mm512_add_epi32(_mm512_set1_epi32(int(2 * c)),
                                          _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
      return _mm512_permutexvar_ps(at, _mm512_castps256_ps512(_mm256_load_ps(g)));
    }
    const __m512i at = _mm512_add_epi32(_mm512_set1_epi32(int(4 * c)),
                                        _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
    return _mm512_permutexvar_ps(at, _mm512_loadu_ps(g));
  }

  // int4 rows, two blocks of 32 per step: their 32 bytes' nibbles, [low, high] (blocks [b, b + 1, b, b + 1]
  // by 16 elements), and per dot lane its block's factor of f[0..1]
  static constexpr int kInt4Blocks = 2;
  T512OPS VEC_INLINE static I int4_nibbles(const uint8_t* p) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)p);
    return _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1),
                            _mm512_set1_epi8(15));
  }
  T512OPS VEC_INLINE static F by_block(const float* f) {
    const __m128 pair = _mm_castpd_ps(_mm_load_sd((const double*)f));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1),
                                 _mm512_castps128_ps512(pair));
  }

  // rows interleaved by eights (r8_tile): a vector's low and high nibbles; 8 bytes repeated
  // in every 64-bit lane; and the 8 rows' sums (two int32 lanes each, 2r and 2r + 1) from kR8Slots
  // vectors (one here, 8 rows in one)
  static constexpr int kR8Slots = 1;
  T512OPS VEC_INLINE static I low_nibbles(I v) { return _mm512_and_si512(v, _mm512_set1_epi8(15)); }
  T512OPS VEC_INLINE static I high_nibbles(I v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(15)); }
  T512OPS VEC_INLINE static I bcast8(const int8_t* p) {
    int64_t v;
    std::memcpy(&v, p, 8);
    return _mm512_set1_epi64(v);
  }
  // the 8 rows' float sums from kR8Slots vectors of two lanes per row
  T512OPS VEC_INLINE static __m256 fold8(const F* s) {
    const __m512 pairs = _mm512_add_ps(s[0], _mm512_permute_ps(s[0], 0xB1));  // lanes 2r, 2r + 1: row r's sum
    return _mm512_castps512_ps256(
        _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0), pairs));
  }
  // row r's value of v (8 rows) in lanes 2r and 2r + 1 (one slot holds the 8 rows here)
  T512OPS VEC_INLINE static F row_pairs(__m256 v, int) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7), _mm512_castps256_ps512(v));
  }
  T512OPS VEC_INLINE static I set1_int(int32_t v) { return _mm512_set1_epi32(v); }
  // int8 codes as unsigned ones (plus 128)
  T512OPS VEC_INLINE static I flip_signs(I v) { return _mm512_xor_si512(v, _mm512_set1_epi8(char(0x80))); }
  // codes + 16 in byte i where bit i of the kBytes / 8 bytes at p is set (Q5's fifth bits)
  T512OPS VEC_INLINE static I with_fifth_bits(I codes, const uint8_t* p) {
    uint64_t bits;
    std::memcpy(&bits, p, 8);
    return _mm512_mask_add_epi8(codes, __mmask64(bits), codes, _mm512_set1_epi8(16));
  }
};

// What V256 with VNNI and V256 without share; each adds its own dot (a function's target cannot depend on
// a template argument).
struct V256Base {
  using F = __m256;
  using I = __m256i;
  static constexpr int kLanes = 8, kBytes = 32;
  static constexpr bool kWide = false;
  static I dot_wide(const I a[2], const I x[2]);
  static void widen32(const int8_t* q, const int8_t* r, int16_t* w);
  template <class Fm>
  static void wide_codes(const uint8_t* unit, int64_t j, I out[2]);

  T256OPS VEC_INLINE static F zero() { return _mm256_setzero_ps(); }
  T256OPS VEC_INLINE static F set1(float v) { return _mm256_set1_ps(v); }
  T256OPS VEC_INLINE static F load(const float* p) { return _mm256_loadu_ps(p); }
  T256OPS VEC_INLINE static F load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  T256OPS VEC_INLINE static F load_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  T256OPS VEC_INLINE static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  T256OPS VEC_INLINE static F load_partial(const float* p, int64_t n) { return floats8(p, n); }
  T256OPS VEC_INLINE static F of16(const __m256 h[2], int i) { return h[i]; }
  T256OPS VEC_INLINE static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  T256OPS VEC_INLINE static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  T256OPS VEC_INLINE static F fmsub(F a, F b, F c) { return _mm256_fmsub_ps(a, b, c); }
  T256OPS VEC_INLINE static F abs_max(F m, F v) { return _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v)); }
  T256OPS VEC_INLINE static float sum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  T256OPS VEC_INLINE static __m128 sum4(F a, F b, F c, F d) {
    const F ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    const F cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
    const F abcd = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
  }
  T256OPS VEC_INLINE static F max(F a, F b) { return _mm256_max_ps(a, b); }
  T256OPS VEC_INLINE static F of8(__m256 v) { return v; }
  T256OPS VEC_INLINE static F add(F a, F b) { return _mm256_add_ps(a, b); }
  T256OPS VEC_INLINE static F zero_below(F y, F x, float lo) {
    return _mm256_and_ps(y, _mm256_cmp_ps(x, _mm256_set1_ps(lo), _CMP_GE_OQ));
  }
  T256OPS VEC_INLINE static F pow2(I n) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23)); }
  T256OPS VEC_INLINE static F clamp(F x, float lo, float hi) {
    return _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
  }
  T256OPS VEC_INLINE static float max(F v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  T256OPS VEC_INLINE static F int8_floats(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  }

  T256OPS VEC_INLINE static F uint8_floats(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  }

  T256OPS VEC_INLINE static I zero_int() { return _mm256_setzero_si256(); }
  T256OPS VEC_INLINE static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  T256OPS VEC_INLINE static I times256(I a) { return _mm256_slli_epi32(a, 8); }
  T256OPS VEC_INLINE static I clamp_int8(I a) {
    return _mm256_min_epi32(_mm256_max_epi32(a, _mm256_set1_epi32(-128)), _mm256_set1_epi32(127));
  }
  T256OPS VEC_INLINE static I loadi(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
  T256OPS VEC_INLINE static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  T256OPS VEC_INLINE static I round(F v) { return _mm256_cvtps_epi32(v); }
  T256OPS VEC_INLINE static int32_t sum(I v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
  }
  T256OPS VEC_INLINE static void store_int8(int8_t* p, I v) {
    // packs work within 128-bit lanes: each lane's 4 values end up in its low 4 bytes
    const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(v, v), _mm256_setzero_si256());
    _mm_storel_epi64((__m128i*)p, _mm_unpacklo_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
  }

  template <class Fm>
  T256OPS VEC_INLINE static I codes(const uint8_t* unit, int64_t j) { return Fm::codes32(unit, j); }

  // g[2c + lane / 4]; where g holds one factor per 32 elements (kSpan 32), g[c] in every lane
  template <int kSpan>
  T256OPS VEC_INLINE static F by_group(const float* g, int64_t c) {
    if constexpr (kSpan == 32) return _mm256_broadcast_ss(g + c);
    const __m128 pair = _mm_castpd_ps(_mm_load_sd((const double*)(g + 2 * c)));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(pair), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  }

  static constexpr int kInt4Blocks = 1;
  T256OPS VEC_INLINE static I int4_nibbles(const uint8_t* p) {
    const __m128i v = _mm_loadu_si128((const __m128i*)p);
    return _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1),
                            _mm256_set1_epi8(15));
  }
  T256OPS VEC_INLINE static F by_block(const float* f) { return _mm256_set1_ps(*f); }
  static constexpr int kR8Slots = 2;  // rows 0..3 and 4..7
  T256OPS VEC_INLINE static I low_nibbles(I v) { return _mm256_and_si256(v, _mm256_set1_epi8(15)); }
  T256OPS VEC_INLINE static I high_nibbles(I v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15)); }
  T256OPS VEC_INLINE static I bcast8(const int8_t* p) {
    int64_t v;
    std::memcpy(&v, p, 8);
    return _mm256_set1_epi64x(v);
  }
  // hadd gives rows 0 1 4 5 | 2 3 6 7; the 64-bit lanes in order 0 2 1 3 put them right
  T256OPS VEC_INLINE static __m256 fold8(const F* s) {
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_hadd_ps(s[0], s[1])), 0xD8));
  }
  // row r's value of v (8 rows) in lanes 2r and 2r + 1 of slot i (rows 4i..4i + 3)
  T256OPS VEC_INLINE static F row_pairs(__m256 v, int i) {
    return _mm256_permutevar8x32_ps(v, i ? _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7) : _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  }
  T256OPS VEC_INLINE static I set1_int(int32_t v) { return _mm256_set1_epi32(v); }
  T256OPS VEC_INLINE static I flip_signs(I v) { return _mm256_xor_si256(v, _mm256_set1_epi8(char(0x80))); }
  T256OPS VEC_INLINE static I with_fifth_bits(I codes, const uint8_t* p) {
    uint32_t bits;
    std::memcpy(&bits, p, 4);
    return _mm256_or_si256(codes, bit16(bits));
  }
};

// AVX2 with AVX-VNNI (Alder Lake and later, Zen 5; Sapphire Rapids has it beside AVX-512).
struct V256Vnni : V256Base {
  template <int kBits>
  T256VNNIOPS VEC_INLINE static I dot(I acc, I a, I b) { return _mm256_dpbusd_avx_epi32(acc, a, b); }
  template <int kBits>
  T256VNNIOPS VEC_INLINE static I dot_pair(I acc, I a0, I b0, I a1, I b1) {
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc, a0, b0), a1, b1);
  }
};

// AVX2 alone: maddubs sums pairs into int16, which saturates unless 2 * 255 * 128 fits; codes of up to
// 6 bits always fit (2 * 63 * 128), wider codes go as two nibbles.
//
// Two-part activations go whole (kWide): x = 256 q + r as int16, multiplied by the codes widened to int16
// with madd (2 * 255 * 32639 fits int32). Per 32 codes that is two madds and two or three shifts and ands
// (wide_codes), where the parts take two maddubs, two madds and a shift, four of each for 8-bit codes. A
// wide vector pair holds a block of 32 as its even elements, then its odd ones: 16-bit lanes of the
// codes' bytes give them with shifts and masks, no shuffles (Q4_K's nibbles as well: QK45::codes_wide),
// and a dot lane's four elements stay within one group of 16.
struct V256Madd : V256Base {
  static constexpr bool kWide = true;

  template <int kBits>
  T256OPS VEC_INLINE static I dot(I acc, I a, I b) {
    const __m256i ones = _mm256_set1_epi16(1);
    if constexpr (kBits <= 6) {
      return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
    } else {
      const __m256i nib = _mm256_set1_epi8(15);
      const __m256i lo = _mm256_and_si256(a, nib), hi = _mm256_and_si256(_mm256_srli_epi16(a, 4), nib);
      const __m256i low = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, b), ones);
      const __m256i high = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, b), _mm256_set1_epi16(16));
      return _mm256_add_epi32(_mm256_add_epi32(acc, low), high);
    }
  }

  // acc + dot(a0, b0) + dot(a1, b1): codes of up to 6 bits sum their two maddubs in int16 (2 * 2 * 63 *
  // 128 fits) and widen once, 4 operations where two dots take 6
  template <int kBits>
  T256OPS VEC_INLINE static I dot_pair(I acc, I a0, I b0, I a1, I b1) {
    if constexpr (kBits <= 6) {
      const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(a0, b0), _mm256_maddubs_epi16(a1, b1));
      return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    } else {
      return dot<kBits>(dot<kBits>(acc, a0, b0), a1, b1);
    }
  }

  // elements [32j, 32j + 32) of a unit of format Fm as 16-bit codes, even elements then odd ones: its own
  // codes_wide where it has one, else its codes32's bytes split
  template <class Fm>
  T256OPS VEC_INLINE static void wide_codes(const uint8_t* unit, int64_t j, I out[2]) {
    if constexpr (HasCodesWide<Fm>::value) {
      Fm::codes_wide(unit, j, out);
    } else {
      const __m256i v = Fm::codes32(unit, j);
      out[0] = _mm256_and_si256(v, _mm256_set1_epi16(0xFF));
      out[1] = _mm256_srli_epi16(v, 8);
    }
  }

  // the sums of each 4 products of a block's 32 wide codes a[0..1] and wide activations x[0..1]
  T256OPS VEC_INLINE static I dot_wide(const I a[2], const I x[2]) {
    return _mm256_add_epi32(_mm256_madd_epi16(a[0], x[0]), _mm256_madd_epi16(a[1], x[1]));
  }

  // a block of 32 parts q, r as wide activations 256 q + r, even elements then odd ones
  T256OPS VEC_INLINE static void widen32(const int8_t* q, const int8_t* r, int16_t* w) {
    const __m256i qv = _mm256_loadu_si256((const __m256i*)q), rv = _mm256_loadu_si256((const __m256i*)r);
    // an even element is its 16-bit lane's low byte, an odd one its high byte
    const __m256i even = _mm256_add_epi16(_mm256_slli_epi16(qv, 8), _mm256_srai_epi16(_mm256_slli_epi16(rv, 8), 8));
    const __m256i odd = _mm256_add_epi16(_mm256_and_si256(qv, _mm256_set1_epi16(short(0xFF00))), _mm256_srai_epi16(rv, 8));
    _mm256_storeu_si256((__m256i*)w, even);
    _mm256_storeu_si256((__m256i*)(w + 16), odd);
  }
};
#endif  // TRAMONTANE_X86

// Runs CALL (a call of a function of the tile headers) in the copy per_isa.h made for the instruction set
// in use, then THEN (return, continue); on the portable path it does nothing, and the code after it runs.
#ifdef TRAMONTANE_X86
#define BY_ISA(CALL, THEN)                              \
  switch (current_isa()) {                              \
    case Isa::kAvx512: isa_avx512::CALL; THEN;          \
    case Isa::kAvxVnni: isa_avx_vnni::CALL; THEN;       \
    case Isa::kAvx2: isa_avx2::CALL; THEN;              \
    default: break;                                     \
  }
#else
#define BY_ISA(CALL, THEN)
#endif
