// Int4 weights times fp32 activations, through exact integer dot products.
//
// Weight layout (the bytes of GGUF's Q4_0 / Q4_1 blocks, with the scales kept apart): a row is split
// into blocks of 32 elements stored in 16 bytes; byte i holds q[i] in its low nibble and q[i + 16] in
// its high nibble, q in 0..15. The element is (q - 8) * scale[g] (symmetric, Q4_0), or with a minimum
// per group q * scale[g] + min[g] (Q4_1), float16 scale and min per group g of `group` elements (a
// multiple of 32).
//
// Each call first quantizes the rows of x to int8 in blocks of 32 (scale = max|x| / 127, as llama.cpp
// does for its Q4_0 x Q8_0 dot products). An output is then the sum over blocks of
// scale_w * scale_x * dot(q - 8, x_q), the dot in integer arithmetic: VNNI's dpbusd (u8 x s8 -> s32)
// on AVX-512, maddubs + madd on AVX2. The -8 is folded in by starting each integer sum at
// -8 * sum(x_q) (`bias`, precomputed with the quantized activations); a minimum adds
// min * scale_x * sum(x_q) per block, sixteen blocks per vector multiply-add. Weight bytes are widened
// to nibbles once per tile and reused for every row of x.

#include "common.h"

namespace {

// Activations quantized for one call. `pairs` lays blocks 2p and 2p + 1 out as they come out of the
// AVX-512 nibble split of their 32 weight bytes: [x_2p[0:16], x_2p+1[0:16], x_2p[16:32], x_2p+1[16:32]];
// a last unpaired block, and every block without `pairs`, keeps its natural order.
struct QuantizedX {
  torch::Tensor q;      // int8 [M, K]
  torch::Tensor scale;  // float [M, K / 32]
  torch::Tensor bias;   // int32 [M, K / 4]: -8 times the sum of each 4 consecutive bytes of q
  torch::Tensor sum;    // float [M, K / 32]: scale * sum of q, per block (for a minimum's term)
  const int8_t* qp;
  const float* sp;
  const int32_t* bp;
  const float* sum_p;
};

#ifdef TRAMONTANE_X86
// The paired blocks of one row of x (blocks [0, paired)), as the scalar loop below lays them out, with the
// same arithmetic: |x| maxima, x * (127 / max) rounded to nearest even by the conversion, and the bias
// from VNNI's own byte sums. The scalar loop's per-element rounding call cost several microseconds per
// call, as much as the products of a small matrix.
T512VNNI void quantize_pairs_avx512(const float* x, int64_t paired, int8_t* q, float* s, int32_t* bias, float* sums) {
  const __m512 sign = _mm512_set1_ps(-0.f);
  for (int64_t b = 0; b < paired; b += 2) {
    __m128i parts[2][2];  // [block][half]: 16 bytes each
    for (int64_t j = 0; j < 2; ++j) {
      const float* xb = x + (b + j) * 32;
      const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, lo), _mm512_andnot_ps(sign, hi)));
      const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(inv)));
      const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(inv)));
      s[b + j] = d;
      sums[b + j] = d * float(_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)));
      parts[j][0] = _mm512_cvtsepi32_epi8(qlo);
      parts[j][1] = _mm512_cvtsepi32_epi8(qhi);
    }
    // [x_b[0:16], x_b+1[0:16], x_b[16:32], x_b+1[16:32]]
    int8_t* dst = q + b * 32;
    _mm_storeu_si128((__m128i*)dst, parts[0][0]);
    _mm_storeu_si128((__m128i*)(dst + 16), parts[1][0]);
    _mm_storeu_si128((__m128i*)(dst + 32), parts[0][1]);
    _mm_storeu_si128((__m128i*)(dst + 48), parts[1][1]);
    const __m512i four = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), _mm512_loadu_si512(dst));
    _mm512_storeu_si512(bias + b * 8, _mm512_mullo_epi32(four, _mm512_set1_epi32(-8)));
  }
}
#endif

QuantizedX quantize_x(const float* x, int64_t M, int64_t K, bool pairs) {
  const int64_t nb = K / 32, paired = pairs ? nb / 2 * 2 : 0;
  QuantizedX out;
  out.q = torch::empty({M, K}, torch::kInt8);
  out.scale = torch::empty({M, nb}, torch::kFloat32);
  out.bias = torch::empty({M, K / 4}, torch::kInt32);
  out.sum = torch::empty({M, nb}, torch::kFloat32);
  int8_t* q = out.q.data_ptr<int8_t>();
  float* s = out.scale.data_ptr<float>();
  int32_t* bias = out.bias.data_ptr<int32_t>();
  float* sums = out.sum.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    int64_t done = 0;  // blocks quantized (and their bias written) by the vector path
#ifdef TRAMONTANE_X86
    if (paired) {  // pairs are asked for only with VNNI
      quantize_pairs_avx512(x + m * K, paired, q + m * K, s + m * nb, bias + m * (K / 4), sums + m * nb);
      done = paired;
    }
#endif
    for (int64_t b = done; b < nb; ++b) {
      const float* xb = x + m * K + b * 32;
      float amax = 0.f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      s[m * nb + b] = d;
      int8_t* dst = q + m * K + b * 32;
      int32_t total = 0;
      for (int i = 0; i < 32; ++i) {
        const int8_t v = int8_t(std::nearbyint(xb[i] * inv));
        total += v;
        // paired: element i of block b sits at (i / 16) * 32 + (b % 2) * 16 + i % 16 of its pair
        if (b < paired) q[m * K + (b / 2) * 64 + (b % 2) * 16 + (i / 16) * 32 + i % 16] = v;
        else dst[i] = v;
      }
      sums[m * nb + b] = d * float(total);
    }
    const int8_t* qm = q + m * K;
    for (int64_t j = done * 8; j < K / 4; ++j)
      bias[m * (K / 4) + j] = -8 * (qm[4 * j] + qm[4 * j + 1] + qm[4 * j + 2] + qm[4 * j + 3]);
  }
  out.qp = q;
  out.sp = s;
  out.bp = bias;
  out.sum_p = sums;
  return out;
}

inline float half_to_float(uint16_t h) { return float(c10::Half(h, c10::Half::from_bits())); }

// ---------------------------------------------------------------------------------------- portable
void int4_rows_ref(const QuantizedX& qx, int64_t M, int64_t K, const uint8_t* w, const uint16_t* wscale,
                   const uint16_t* wmin, int64_t group, float* y, int64_t N, int64_t begin, int64_t end) {
  const int64_t nb = K / 32, groups = K / group;
  const int32_t offset = wmin ? 0 : 8;
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = w + o * (K / 2);
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xq = qx.qp + m * K;
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t dot = 0;
        for (int i = 0; i < 16; ++i) {
          const uint8_t byte = row[b * 16 + i];
          dot += (int32_t(byte & 15) - offset) * xq[b * 32 + i] + (int32_t(byte >> 4) - offset) * xq[b * 32 + i + 16];
        }
        const int64_t g = o * groups + b * 32 / group;
        acc += float(dot) * half_to_float(wscale[g]) * qx.sp[m * nb + b];
        if (wmin) acc += half_to_float(wmin[g]) * qx.sum_p[m * nb + b];
      }
      y[m * N + o] = acc;
    }
  }
}

#ifdef TRAMONTANE_X86
// ---------------------------------------------------------------------------------------- AVX-512 VNNI
// Two blocks per step: their 32 bytes widen to 64 nibbles [low nibbles, high nibbles], and dpbusd
// leaves block 2p's sums in lanes 0-3 and 8-11, block 2p + 1's in lanes 4-7 and 12-15. The combined
// scales of a chunk of 16 blocks are computed once per tile and spread to those lanes by a permute.
template <int R, int T>
T512VNNI inline void int4_tile_vnni(const QuantizedX& qx, int64_t K, const uint8_t* w, const uint16_t* wscale,
                                    const uint16_t* wmin, int64_t group, float* y, int64_t N, int64_t o, int64_t m0) {
  const int64_t nb = K / 32, groups = K / group, row_bytes = K / 2;
  const NextTile<R> next(w, row_bytes, o, N, m0), next_scales(wscale, groups * 2, o, N, m0),
      next_mins(wmin ? wmin : wscale, groups * 2, o, N, m0);
  const __m512i nib = _mm512_set1_epi8(15);
  const __m256i nib256 = _mm256_set1_epi8(15);
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
  alignas(64) float cs[R][T][16];
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < nb; c0 += 16) {
    const int64_t cn = std::min<int64_t>(16, nb - c0);
    const __mmask16 live = __mmask16((1u << cn) - 1);
    for (int r = 0; r < R; ++r) {
      const __m512 ws = block_halfs(wscale + (o + r) * groups, c0, cn, group);
      for (int t = 0; t < T; ++t)
        _mm512_store_ps(cs[r][t], _mm512_mul_ps(ws, _mm512_maskz_loadu_ps(live, qx.sp + (m0 + t) * nb + c0)));
      if (wmin) {  // min * scale_x * sum(x_q) for the chunk's 16 blocks at once
        const __m512 mn = block_halfs(wmin + (o + r) * groups, c0, cn, group);
        for (int t = 0; t < T; ++t)
          acc[r][t] = _mm512_fmadd_ps(mn, _mm512_maskz_loadu_ps(live, qx.sum_p + (m0 + t) * nb + c0), acc[r][t]);
      }
    }
    next_scales.at(c0 * 2);
    if (wmin) next_mins.at(c0 * 2);
    const int64_t paired_end = c0 + (cn & ~int64_t(1));
    for (int64_t b = c0; b < paired_end; b += 2) {
      next.at(b * 16);
      __m512i wv[R];
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(w + (o + r) * row_bytes + b * 16));
        wv[r] = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1), nib);
      }
      for (int t = 0; t < T; ++t) {
        const __m512i xv = _mm512_loadu_si512(qx.qp + (m0 + t) * K + b * 32);
        const __m512i bv = wmin ? _mm512_setzero_si512() : _mm512_loadu_si512(qx.bp + (m0 + t) * (K / 4) + b * 8);
        for (int r = 0; r < R; ++r) {
          const __m512i d = _mm512_dpbusd_epi32(bv, wv[r], xv);
          const __m128 pair = _mm_castpd_ps(_mm_load_sd((const double*)&cs[r][t][b - c0]));
          const __m512 sc = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(pair));
          acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc[r][t]);
        }
      }
    }
    if (cn & 1) {  // the row's last block, unpaired, in natural order
      const int64_t b = paired_end;
      for (int r = 0; r < R; ++r) {
        const __m128i v = _mm_loadu_si128((const __m128i*)(w + (o + r) * row_bytes + b * 16));
        const __m256i wv = _mm256_and_si256(
            _mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1), nib256);
        for (int t = 0; t < T; ++t) {
          const __m256i xv = _mm256_loadu_si256((const __m256i*)(qx.qp + (m0 + t) * K + b * 32));
          const __m256i bv =
              wmin ? _mm256_setzero_si256() : _mm256_loadu_si256((const __m256i*)(qx.bp + (m0 + t) * (K / 4) + b * 8));
          const __m256 part = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_dpbusd_epi32(bv, wv, xv)),
                                            _mm256_set1_ps(cs[r][t][b - c0]));
          acc[r][t] = _mm512_add_ps(acc[r][t], _mm512_zextps256_ps512(part));
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[(m0 + t) * N + o + r] = _mm512_reduce_add_ps(acc[r][t]);
}

T512VNNI void int4_rows_vnni(const QuantizedX& qx, int64_t M, int64_t K, const uint8_t* w, const uint16_t* wscale,
                             const uint16_t* wmin, int64_t group, float* y, int64_t N, int64_t begin, int64_t end) {
  walk(M, begin, end, DISPATCH_TILE(int4_tile_vnni, qx, K, w, wscale, wmin, group, y, N));
}

// ---------------------------------------------------------------------------------------- AVX2
// One block per step: 16 bytes widen to 32 nibbles in natural order; maddubs + madd sum each 4.
template <int R, int T>
T256 inline void int4_tile_avx2(const QuantizedX& qx, int64_t K, const uint8_t* w, const uint16_t* wscale,
                                const uint16_t* wmin, int64_t group, float* y, int64_t N, int64_t o, int64_t m0) {
  const int64_t nb = K / 32, groups = K / group, row_bytes = K / 2;
  const NextTile<R> next(w, row_bytes, o, N, m0), next_scales(wscale, groups * 2, o, N, m0),
      next_mins(wmin ? wmin : wscale, groups * 2, o, N, m0);
  const __m256i nib = _mm256_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) float cs[R][T][16];
  __m256 acc[R][T];
  float minterm[R][T] = {};
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < nb; c0 += 16) {
    const int64_t cn = std::min<int64_t>(16, nb - c0);
    for (int r = 0; r < R; ++r) {
      int64_t i = 0;
      if (group == 32) {  // eight blocks at a time; minimum terms go straight into the accumulators
        const uint16_t* srow = wscale + (o + r) * groups + c0;
        for (; i + 8 <= cn; i += 8) {
          const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(srow + i)));
          for (int t = 0; t < T; ++t)
            _mm256_store_ps(&cs[r][t][i], _mm256_mul_ps(ws, _mm256_loadu_ps(qx.sp + (m0 + t) * nb + c0 + i)));
          if (wmin) {
            const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(wmin + (o + r) * groups + c0 + i)));
            for (int t = 0; t < T; ++t)
              acc[r][t] = _mm256_fmadd_ps(mn, _mm256_loadu_ps(qx.sum_p + (m0 + t) * nb + c0 + i), acc[r][t]);
          }
        }
      }
      for (; i < cn; ++i) {
        const int64_t g = (o + r) * groups + (group == 32 ? c0 + i : (c0 + i) * 32 / group);
        const float ws = _cvtsh_ss(wscale[g]);
        for (int t = 0; t < T; ++t) cs[r][t][i] = ws * qx.sp[(m0 + t) * nb + c0 + i];
        if (wmin)
          for (int t = 0; t < T; ++t) minterm[r][t] += _cvtsh_ss(wmin[g]) * qx.sum_p[(m0 + t) * nb + c0 + i];
      }
    }
    next_scales.at(c0 * 2);
    if (wmin) next_mins.at(c0 * 2);
    for (int64_t b = c0; b < c0 + cn; ++b) {
      next.at(b * 16);
      __m256i wv[R];
      for (int r = 0; r < R; ++r) {
        const __m128i v = _mm_loadu_si128((const __m128i*)(w + (o + r) * row_bytes + b * 16));
        wv[r] = _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1), nib);
      }
      for (int t = 0; t < T; ++t) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(qx.qp + (m0 + t) * K + b * 32));
        const __m256i bv =
            wmin ? _mm256_setzero_si256() : _mm256_loadu_si256((const __m256i*)(qx.bp + (m0 + t) * (K / 4) + b * 8));
        for (int r = 0; r < R; ++r) {
          const __m256i d = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(wv[r], xv), ones), bv);
          acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(cs[r][t][b - c0]), acc[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[(m0 + t) * N + o + r] = hsum256(acc[r][t]) + minterm[r][t];
}

T256 void int4_rows_avx2(const QuantizedX& qx, int64_t M, int64_t K, const uint8_t* w, const uint16_t* wscale,
                         const uint16_t* wmin, int64_t group, float* y, int64_t N, int64_t begin, int64_t end) {
  walk(M, begin, end, DISPATCH_TILE(int4_tile_avx2, qx, K, w, wscale, wmin, group, y, N));
}
#endif  // TRAMONTANE_X86

void check_int4(const torch::Tensor& w, const torch::Tensor& scale, const c10::optional<torch::Tensor>& mins,
                int64_t group) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8 && w.is_contiguous(), "w must be contiguous uint8 [N, K/2]");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(group > 0 && group % 32 == 0 && K % group == 0, "group size must be a multiple of 32 that divides K");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat16 && scale.is_contiguous() && scale.numel() == N * (K / group),
              "scale must be contiguous float16 [N, K/group]");
  if (mins)
    TORCH_CHECK(mins->scalar_type() == torch::kFloat16 && mins->is_contiguous() && mins->numel() == N * (K / group),
                "mins must be contiguous float16 [N, K/group]");
}

const uint16_t* half_bits(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); }

}  // namespace

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> mins,
                          int64_t group) {
  check_int4(w, scale, mins, group);
  const int64_t N = w.size(0), K = w.size(1) * 2, M = x.size(0);
  check_x(x, K);
  const Isa path = current_isa();
  if (M >= kAmxMinRowsInt4 && amx_in_use()) {
    auto y = torch::empty({M, N}, x.options());
    int4_linear_amx(x.data_ptr<float>(), M, K, w.data_ptr<uint8_t>(), half_bits(scale),
                    mins ? half_bits(*mins) : nullptr, group, y.data_ptr<float>(), N);
    return y;
  }
  const bool vnni = path == Isa::kAvx512 && has_avx512_vnni();
  const QuantizedX qx = quantize_x(x.data_ptr<float>(), M, K, vnni);
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* sp = half_bits(scale);
  const uint16_t* mp = mins ? half_bits(*mins) : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain(N), [&](int64_t begin, int64_t end) {
#ifdef TRAMONTANE_X86
    if (vnni) return int4_rows_vnni(qx, M, K, wp, sp, mp, group, yp, N, begin, end);
    if (path != Isa::kRef) return int4_rows_avx2(qx, M, K, wp, sp, mp, group, yp, N, begin, end);
#endif
    int4_rows_ref(qx, M, K, wp, sp, mp, group, yp, N, begin, end);
  });
  return y;
}

// Dequantize packed int4 rows to fp32 [N, K] (for prefill, where a GEMM on fp32 weights wins).
torch::Tensor int4_dequantize(torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> mins, int64_t group) {
  check_int4(w, scale, mins, group);
  const int64_t N = w.size(0), K = w.size(1) * 2, groups = K / group;
  auto out = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* sp = half_bits(scale);
  const uint16_t* mp = mins ? half_bits(*mins) : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* row = wp + o * (K / 2);
      float* dst = op + o * K;
      for (int64_t b = 0; b < K / 32; ++b) {
        const int64_t g = o * groups + b * 32 / group;
        const float s = half_to_float(sp[g]);
        const float base = mp ? half_to_float(mp[g]) : -8.f * s;  // (q - 8) * s = q * s - 8 s
#pragma omp simd
        for (int64_t i = 0; i < 16; ++i) {
          dst[b * 32 + i] = float(row[b * 16 + i] & 15) * s + base;
          dst[b * 32 + i + 16] = float(row[b * 16 + i] >> 4) * s + base;
        }
      }
    }
  });
  return out;
}
