// GGUF block formats kept as the file stores them: Q8_0, Q5_0, Q5_1 and the K-quants Q4_K, Q5_K, Q6_K.
//
// A weight row is the file's bytes, unchanged: a run of units of kUnit elements (a K-quant super-block
// of 256, or two 32-element blocks). Every format reads as the same two things, which is all a kernel
// needs (learned from ggml-cpu's quants.c; written anew here):
//   - codes: one unsigned byte per element, in the row's order (the 4, 5, 6 or 8 bits of the format,
//     made unsigned: Q8_0's int8 plus 128, Q6_K's 6 bits as stored);
//   - per 16 elements a scale and an offset: value = scale * code + offset (offset folds in a format's
//     minimum, Q6_K's -32 or Q8_0's -128, so codes never need a sign).
// So a new format is one small header with one struct (block_format.h says what it holds): its unit size,
// its bytes per unit, and how to read its codes and scales (one element at a time for the portable path,
// 32 codes or a unit's scales at a time with AVX2 instructions for the vector ones); the dot products,
// dequantization and dispatch are written once over it (blocks_tiles.h, compiled once per instruction set).
//
// Products split each row of x into two int8 parts per element in blocks of 32 (split_ref, common.h: x =
// d (q + r / 256), d = max|x| / 127), then per 16 elements g: scale_g * d / 256 * ((dot(code, q) << 8) +
// dot(code, r)) + offset_g * sum(x) (with one part, activation_parts: scale_g * d * dot(code, q) + ...), the dots in integers (VNNI's dpbusd multiplies unsigned codes by
// signed x without saturation; AVX2's maddubs does for codes up to 6 bits, and takes wider ones as two
// nibbles). Values dequantize exactly as gguf-py's reference does: each product scale * code is exact in fp32, so one
// rounding remains, the same one.
//
// On AMX CPUs, from amx_min_rows<F>() rows of x on, products go through AMX tiles instead (amx.h): each
// weight dequantizes once to bf16, whatever the number of rows of x, and x rounds to bf16 instead of int8.

#include "amx.h"
#include "blocks.h"
#include "int4.h"
#include "q5.h"
#include "q6_k.h"
#include "q8_0.h"
#include "qk45.h"
#include "simd.h"

#include <tuple>
#include <vector>

namespace {

using namespace blockfmt;  // the formats and what they share (block_format.h)

// ---------------------------------------------------------------------------------------- activations
// Rows of x in P int8 parts per element (split_ref, common.h; r is empty with one part), with per 16
// elements the block's step (part_step) and x's sum as the parts hold it.
template <int P>
struct Act {
  at::Tensor q, r, wide, dx, xs;  // int8 [M, K] (r: P = 2 only); int16 [M, K] (kWide, simd.h); float [M, K / 16] twice
  const int8_t* qp;
  const int8_t* rp;
  const int16_t* wp;
  const float* dxp;
  const float* xsp;
};

template <int P>
void quantize_row_ref(const float* x, int64_t K, int8_t* q, int8_t* r, float* dx, float* xs) {
  for (int64_t b = 0; b < K / 32; ++b) {
    int32_t totals[2];
    const float d = split_block_ref<P>(x + 32 * b, q + 32 * b, r + 32 * b, totals);
    for (int h = 0; h < 2; ++h) {
      dx[2 * b + h] = part_step<P>(d);
      xs[2 * b + h] = part_step<P>(d) * float(totals[h]);
    }
  }
}

// ---------------------------------------------------------------------------------------- portable
template <class F, int P>
void rows_ref(const Act<P>& a, int64_t M, int64_t K, const uint8_t* w, float* y, int64_t N, int64_t begin, int64_t end) {
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
        const int8_t* xr = P == 2 ? a.rp + m * K + u * F::kUnit : xq;
        const int64_t g0 = m * (K / 16) + u * (F::kUnit / 16);
        for (int64_t g = 0; g < F::kUnit / 16; ++g) {
          int32_t dot = 0;
          for (int i = 0; i < 16; ++i)
            dot += int32_t(codes[16 * g + i]) * (P == 2 ? 256 * xq[16 * g + i] + xr[16 * g + i] : xq[16 * g + i]);
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

template <int P>
Act<P> quantize_act(const float* x, int64_t M, int64_t K) {
  Act<P> a;
  a.q = at::empty({M, K}, at::kChar);
  a.r = at::empty({P == 2 ? M : 0, K}, at::kChar);
  bool wide = false;
  BY_ISA(takes_wide(wide), break);
  a.wide = at::empty({P == 2 && wide ? M : 0, K}, at::kShort);
  a.dx = at::empty({M, K / 16}, at::kFloat);
  a.xs = at::empty({M, K / 16}, at::kFloat);
  int8_t* q = a.q.template data_ptr<int8_t>();
  int8_t* r = P == 2 ? a.r.template data_ptr<int8_t>() : nullptr;
  float* dx = a.dx.template data_ptr<float>();
  float* xs = a.xs.template data_ptr<float>();
  int16_t* wd = a.wide.numel() ? a.wide.template data_ptr<int16_t>() : nullptr;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    int8_t *qm = q + m * K, *rm = r ? r + m * K : nullptr;
    float *dxm = dx + m * (K / 16), *xsm = xs + m * (K / 16);
    BY_ISA(quantize_row<P>(xm, K, qm, rm, wd ? wd + m * K : nullptr, dxm, xsm), continue);
    quantize_row_ref<P>(xm, K, qm, rm, dxm, xsm);
  }
  a.qp = q;
  a.rp = r;
  a.wp = wd;
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
      scales16_of<F>(w + (o + r) * row_bytes + u * F::kBytes, 1, s, f);
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
// what that many rows of dot products do (benchmarks/dot_rates.py, tiles against VNNI on a 4096 x 4096
// matrix). Q8_0 needs more rows than the K-quants: its units gather each block's scale, where K-quant
// units read theirs with a few vector loads.
template <class F>
constexpr int64_t amx_min_rows() {
  return F::kUnit == 256 ? 6 : 9;
}

template <class F>
int64_t check_blocks(F, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.device().is_cpu(),
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

// Rows of `kind` interleaved by eights (int4.cpp's R8Rows): Q5_0, Q5_1 or Q8_0, whole groups of 8.
static void check_interleaved(int64_t kind, int64_t N) {
  TORCH_CHECK(kind == kQ5_0 || kind == kQ5_1 || kind == kQ8_0,
              "rows interleaved by eights: Q5_0, Q5_1 or Q8_0 only, got ggml type ", kind);
  TORCH_CHECK(N % 8 == 0, "interleaved rows come in eights, got ", N, " rows");
}

at::Tensor block_linear(at::Tensor x, at::Tensor w, int64_t kind, bool interleaved) {
  return with_format(kind, [&](auto f) {
    using F = decltype(f);
    const int64_t K = check_blocks(f, w), N = w.size(0), M = x.size(0);
    check_x(x, K);
    if (interleaved) {  // rows interleaved by eights (int4.cpp), on every path
      check_interleaved(kind, N);
      return r8_block_linear(x, w, K, int(F::kCodeBits), kind == kQ5_1);
    }
    auto y = at::empty({M, N}, x.options());
#ifdef TRAMONTANE_AMX
    if (M >= amx_min_rows<F>() && amx_in_use()) {
      amx::run(x.data_ptr<float>(), M, BlockRows<F>{w.data_ptr<uint8_t>(), K, w.size(1), {}, {}}, y.data_ptr<float>(), N);
      return y;
    }
#endif
    const uint8_t* wp = w.data_ptr<uint8_t>();
    float* yp = y.data_ptr<float>();
    with_parts([&](auto parts) {
      constexpr int P = decltype(parts)::value;
      const Act<P> a = quantize_act<P>(x.data_ptr<float>(), M, K);
      parallel_pieces(N, grain(N), [&](int64_t begin, int64_t end) {
        BY_ISA(block_rows<F>(a, M, K, wp, yp, N, begin, end), return);
        rows_ref<F>(a, M, K, wp, yp, N, begin, end);
      });
    });
    return y;
  });
}

at::Tensor block_dequantize(at::Tensor w, int64_t kind, bool bf16, bool interleaved) {
  return with_format(kind, [&](auto f) {
    using F = decltype(f);
    const int64_t K = check_blocks(f, w), row_bytes = w.size(1);
    const uint8_t* wp = w.data_ptr<uint8_t>();
    if (interleaved) {  // each row put back in order (int4.cpp), then as below
      check_interleaved(kind, w.size(0));
      return dequantized_rows(w.size(0), K, bf16, [&](int64_t o, float* dst) {
        thread_local std::vector<uint8_t> row;
        row.resize(row_bytes);
        r8_row_in_order(wp, K, int(F::kCodeBits), kind == kQ5_1, o, row.data());
        BY_ISA(dequantize_rows<F>(row.data(), K, dst, 0, 1), return);
        dequantize_rows_ref<F>(row.data(), K, dst, 0, 1);
      });
    }
    return dequantized_rows(w.size(0), K, bf16, [&](int64_t o, float* dst) {
      BY_ISA(dequantize_rows<F>(wp + o * row_bytes, K, dst, 0, 1), return);
      dequantize_rows_ref<F>(wp + o * row_bytes, K, dst, 0, 1);
    });
  });
}
