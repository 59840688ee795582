// Int4 weights times 5 or more rows of fp32 activations, int8 weights times 4 or more, on AMX tiles
// (the tile loop and its layout: amx.h).
//
//   int4 folds the block's scale into the A tile: bf16(q * scale + base), base = -8 * scale (symmetric)
//   or the group's minimum, looked up in a 16-entry table per row and block; int8 values are exact in
//   bf16 and the row's scale multiplies the result.
//
// Rounding activations (and int4 weights) to bf16, 8 significant bits, loses less than the integer
// int4 kernel's int8 activations: on random data the products' relative RMS error is 0.24% against
// 0.53%.

#include "amx.h"

#if defined(TRAMONTANE_AMX)
#include <sys/syscall.h>
#include <unistd.h>
#endif

bool amx_available() {
#ifdef TRAMONTANE_AMX
  static const bool ok = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16") ||
        !__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("avx512vnni") || detect_isa() != Isa::kAvx512)
      return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

#ifdef TRAMONTANE_AMX
namespace {
using amx::run;

// Group-wise int4 (int4.cpp): 16 bytes per block, a float16 scale (and minimum) per group.
struct Int4Rows {
  const uint8_t* w;
  const uint16_t* scale;
  const uint16_t* mins;
  int64_t K, group, row_bytes;
  alignas(64) float d[2][16 * 16], base[2][16 * 16];  // [group][row * 16 + block % 16]: q * d + base

  // the multipliers of blocks [b, b + 16), on every 16th block
  TAMX void prepare(int g, int64_t o, int64_t rows, int64_t b) {
    if (b % 16) return;
    const int64_t groups = K / group, n = std::min<int64_t>(16, K / 32 - b);
    for (int64_t r = 0; r < rows; ++r) {
      __m256 dv[2], mv[2];
      block_halves(scale + (o + r) * groups, b, n, group, dv);
      if (mins) block_halves(mins + (o + r) * groups, b, n, group, mv);
      for (int i = 0; i < 2; ++i) {
        _mm256_store_ps(d[g] + r * 16 + 8 * i, dv[i]);
        _mm256_store_ps(base[g] + r * 16 + 8 * i, mins ? mv[i] : _mm256_mul_ps(dv[i], _mm256_set1_ps(-8.f)));
      }
    }
  }

  // Each row's block goes through a table of its 16 values, bf16(j * d + base) for j = 0..15, which
  // rows r and r + 1 share (words 0-15 and 16-31): 2.5 vector operations per row instead of 9 for
  // converting and scaling every weight. The table's index comes from one 16-bit shift per word of the
  // block's bytes (repeated in each 128-bit lane): lane L shifts by 4 L, so word i of lane L holds the
  // nibble q[k_of(8 L + i)] in its low 4 bits.
  static int64_t k_of(int64_t t) {
    const int64_t lane = t / 8, i = t % 8;  // byte 2 i + (lane >> 1), its high nibble when lane is odd
    return 2 * i + (lane >> 1) + 16 * (lane & 1);
  }

  TAMX void decode(int g, int64_t o, int64_t rows, int64_t b, uint16_t* dst) const {
    const __m512i shifts = _mm512_set_epi64(0x000c000c000c000cLL, 0x000c000c000c000cLL, 0x0008000800080008LL,
                                            0x0008000800080008LL, 0x0004000400040004LL, 0x0004000400040004LL, 0, 0);
    const __m512 j = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i low4 = _mm512_set1_epi16(15), second_row = _mm512_set1_epi16(16);
    const int64_t stride = K / 2;
    const uint8_t* src = w + o * stride + b * 16;
    const float *dr = d[g] + b % 16, *br = base[g] + b % 16;
    auto nibbles = [&](int64_t r) TAMX {
      return _mm512_srlv_epi16(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(src + r * stride))), shifts);
    };
    // rows r and r + 1 (zero when `second` is false)
    auto two_rows = [&](int64_t r, bool second) TAMX {
      const __m512 t0 = _mm512_fmadd_ps(j, _mm512_set1_ps(dr[r * 16]), _mm512_set1_ps(br[r * 16]));
      const __m512 t1 = second ? _mm512_fmadd_ps(j, _mm512_set1_ps(dr[r * 16 + 16]), _mm512_set1_ps(br[r * 16 + 16]))
                               : _mm512_setzero_ps();
      const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(t1, t0);
      _mm512_store_si512(dst + r * 32, _mm512_permutexvar_epi16(_mm512_and_si512(nibbles(r), low4), table));
      // (q & 15) | 16: the table's second row
      _mm512_store_si512(dst + r * 32 + 32,
                         second ? _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(nibbles(r + 1), low4, second_row, 0xEA), table)
                                : _mm512_setzero_si512());
    };
    if (rows == 16) {
      for (int64_t r = 0; r < 16; r += 2) two_rows(r, true);
      return;
    }
    for (int64_t r = 0; r < 16; r += 2) {
      if (r < rows) {
        two_rows(r, r + 1 < rows);
      } else {
        _mm512_store_si512(dst + r * 32, _mm512_setzero_si512());
        _mm512_store_si512(dst + r * 32 + 32, _mm512_setzero_si512());
      }
    }
  }

  void prefetch_side(int64_t o, int64_t rows) const {
    const int64_t groups = K / group;
    for (int64_t r = 0; r < rows; ++r) {
      prefetch_range(scale + (o + r) * groups, groups * 2);
      if (mins) prefetch_range(mins + (o + r) * groups, groups * 2);
    }
  }

  float row_factor(int64_t) const { return 1.f; }
};

// int8 with one fp32 scale per output row (dense.cpp): 32 bytes per block, exact in bf16.
struct Int8Rows {
  const int8_t* w;
  const float* scale;
  int64_t K, row_bytes;

  static int64_t k_of(int64_t t) { return t; }

  void prepare(int, int64_t, int64_t, int64_t) {}

  TAMX void decode(int, int64_t o, int64_t rows, int64_t b, uint16_t* dst) const {
    for (int64_t r = 0; r < 16; ++r) {
      if (r >= rows) {
        _mm512_store_si512(dst + r * 32, _mm512_setzero_si512());
        continue;
      }
      const __m256i v = _mm256_loadu_si256((const __m256i*)(w + (o + r) * K + b * 32));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
      _mm512_store_si512(dst + r * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }

  void prefetch_side(int64_t, int64_t) const {}

  float row_factor(int64_t o) const { return scale[o]; }
};

}  // namespace

// y = x @ dequant(w).T through AMX tiles (see the top of this file); the callers check the arguments.
void int4_linear_amx(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* wscale,
                     const uint16_t* wmin, int64_t group, float* y, int64_t N) {
  run(x, M, Int4Rows{w, wscale, wmin, K, group, K / 2, {}, {}}, y, N);
}

void int8_linear_amx(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, float* y, int64_t N) {
  run(x, M, Int8Rows{w, scale, K, K}, y, N);
}
#else
void int4_linear_amx(const float*, int64_t, int64_t, const uint8_t*, const uint16_t*, const uint16_t*, int64_t,
                     float*, int64_t) {
  TORCH_CHECK(false, "AMX kernels are not built on this platform");
}

void int8_linear_amx(const float*, int64_t, int64_t, const int8_t*, const float*, float*, int64_t) {
  TORCH_CHECK(false, "AMX kernels are not built on this platform");
}
#endif
