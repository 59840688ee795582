// The GGUF block formats' vector kernels (blocks.cpp), written once over the vector width V: per_isa.h
// compiles this file once per instruction set. Includes nothing: blocks.cpp has what it needs in scope,
// per_isa.h the activations' split (split_tiles.h).

// Whether block_tile reads two-part activations whole, as int16 (V::kWide)
inline void takes_wide(bool& wide) { wide = V::kWide; }

// One row of x in P int8 parts per element (split_block, split_tiles.h), in natural order (and whole in
// `wide`, where V takes them so), with per 16 elements the block's step (part_step) and x's sum as the
// parts hold it.
template <int P>
inline void quantize_row(const float* x, int64_t K, int8_t* q, int8_t* r, int16_t* wide, float* dx, float* xs) {
  for (int64_t b = 0; b < K / 32; ++b) {
    int8_t* const qs[2] = {q + 32 * b, q + 32 * b + 16};
    int8_t* const rs[2] = {r ? r + 32 * b : nullptr, r ? r + 32 * b + 16 : nullptr};
    int32_t totals[2];
    const float d = split_block<P>(x + 32 * b, qs, rs, totals);
    if constexpr (P == 2 && V::kWide) V::widen32(q + 32 * b, r + 32 * b, wide + 32 * b);
    for (int h = 0; h < 2; ++h) {
      dx[2 * b + h] = part_step<P>(d);
      xs[2 * b + h] = part_step<P>(d) * float(totals[h]);
    }
  }
}

// A tile of R weight rows x T rows of x, in steps of 256 elements (16 groups of 16: one K-quant unit,
// or four units of the formats in blocks of 32; a row's last step may be shorter). Per step: each
// row's scales and offsets; the scales combined with x's into one factor per scale (per group of 16,
// or per 32 where the format's scales span 32: x's steps are alike in a block's two halves), spread
// over the lanes of the dot sums that it covers, the offsets straight into the accumulators. Per chunk
// of V::kBytes elements: codes decoded once, used for every row of x.
template <int R, int T, class Fm, int P>
inline void block_tile(Fm, const Act<P>& a, int64_t K, const uint8_t* w, float* y, int64_t N, int64_t o, int64_t m0) {
  constexpr int64_t kStep = 256 / Fm::kUnit, kChunks = Fm::kUnit / V::kBytes;  // units per step, chunks per unit
  const int64_t units = K / Fm::kUnit, row_bytes = units * Fm::kBytes, K16 = K / 16;
  const NextTile<R> next(w, row_bytes, o, N, m0);
  alignas(64) float gs[R][T][16];
  typename V::F acc[R][T];
  __m256 offsets[R][T];  // the offsets' share, where scales span 32
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = V::zero(), offsets[r][t] = _mm256_setzero_ps();
  for (int64_t u0 = 0; u0 < units; u0 += kStep) {
    const int64_t n = std::min(kStep, units - u0), groups = n * Fm::kUnit / 16;
    for (int64_t b = (u0 * Fm::kBytes) & ~int64_t(63); b < (u0 + n) * Fm::kBytes; b += 64) next.at(b);
    if constexpr (Fm::kScaleSpan == 32) {
      __m256 dx[T], xs[T];  // per 32 elements: x's step, x's sum
      for (int t = 0; t < T; ++t) {
        const int64_t g0 = (m0 + t) * K16 + u0 * Fm::kUnit / 16;
        dx[t] = evens(floats8(a.dxp + g0, groups), floats8(a.dxp + g0 + 8, groups - 8));
        xs[t] = pair_sums(floats8(a.xsp + g0, groups), floats8(a.xsp + g0 + 8, groups - 8));
      }
      for (int r = 0; r < R; ++r) {
        __m256 sc, off;
        Fm::scales8(w + (o + r) * row_bytes + u0 * Fm::kBytes, n, sc, off);
        for (int t = 0; t < T; ++t) {
          _mm256_store_ps(gs[r][t], _mm256_mul_ps(sc, dx[t]));
          offsets[r][t] = _mm256_fmadd_ps(off, xs[t], offsets[r][t]);
        }
      }
    } else {
      for (int r = 0; r < R; ++r) {
        __m256 sc[2], off[2];
        Fm::scales16(w + (o + r) * row_bytes + u0 * Fm::kBytes, n, sc, off);
        for (int t = 0; t < T; ++t) {
          const int64_t g0 = (m0 + t) * K16 + u0 * Fm::kUnit / 16;
          for (int i = 0; i < 16 / V::kLanes; ++i) {
            const int64_t left = groups - i * V::kLanes;
            V::store(gs[r][t] + i * V::kLanes, V::mul(V::of16(sc, i), V::load_partial(a.dxp + g0 + i * V::kLanes, left)));
            acc[r][t] = V::fmadd(V::of16(off, i), V::load_partial(a.xsp + g0 + i * V::kLanes, left), acc[r][t]);
          }
        }
      }
    }
    for (int64_t u = 0; u < n; ++u) {
      const uint8_t* unit = w + (u0 + u) * Fm::kBytes;
#pragma GCC unroll 8
      for (int j = 0; j < kChunks; ++j) {  // elements [j * kBytes, (j + 1) * kBytes) of the unit, the step's chunk c
        const int64_t c = u * kChunks + j;
        constexpr bool kWide = P == 2 && V::kWide;
        typename V::I codes[R][kWide ? 2 : 1];  // wide: as 16-bit codes, even elements then odd ones
        for (int r = 0; r < R; ++r) {
          if constexpr (kWide) V::template wide_codes<Fm>(unit + (o + r) * row_bytes, j, codes[r]);
          else codes[r][0] = V::template codes<Fm>(unit + (o + r) * row_bytes, j);
        }
        for (int t = 0; t < T; ++t) {
          const int64_t at = (m0 + t) * K + u0 * Fm::kUnit + c * V::kBytes;
          const auto add = [&](int r, typename V::I dot) {  // the chunk's integer dot, scaled, into row r's sum
            acc[r][t] = V::fmadd(V::to_float(dot), V::template by_group<Fm::kScaleSpan>(gs[r][t], c), acc[r][t]);
          };
          if constexpr (kWide) {
            const typename V::I xw[2] = {V::loadi(a.wp + at), V::loadi(a.wp + at + V::kBytes / 2)};
            for (int r = 0; r < R; ++r) add(r, V::dot_wide(codes[r], xw));
          } else if constexpr (P == 2) {
            const typename V::I xq = V::loadi(a.qp + at), xr = V::loadi(a.rp + at);
            for (int r = 0; r < R; ++r) {
              const typename V::I whole = V::template dot<Fm::kCodeBits>(V::zero_int(), codes[r][0], xq);
              add(r, V::template dot<Fm::kCodeBits>(V::times256(whole), codes[r][0], xr));
            }
          } else {
            const typename V::I xq = V::loadi(a.qp + at);
            for (int r = 0; r < R; ++r) add(r, V::template dot<Fm::kCodeBits>(V::zero_int(), codes[r][0], xq));
          }
        }
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int r = 0; r < R; ++r) acc[r][t] = V::add(acc[r][t], V::of8(offsets[r][t]));
    if constexpr (R == 4) {  // four rows' sums through one transposing tree (a row's tile never depends on timing)
      _mm_storeu_ps(y + (m0 + t) * N + o, V::sum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
    } else {
      for (int r = 0; r < R; ++r) y[(m0 + t) * N + o + r] = V::sum(acc[r][t]);
    }
  }
}

template <class Fm, int P>
void block_rows(const Act<P>& a, int64_t M, int64_t K, const uint8_t* w, float* y, int64_t N, int64_t begin, int64_t end) {
  const Fm fmt{};
  walk(M, begin, end, DISPATCH_TILE(block_tile, fmt, a, K, w, y, N));
}

// Rows [begin, end) as fp32: each value scale * code + offset in one rounding (the product is exact),
// as the reference computes it.
template <class Fm>
void dequantize_rows(const uint8_t* w, int64_t K, float* out, int64_t begin, int64_t end) {
  const int64_t units = K / Fm::kUnit, row_bytes = units * Fm::kBytes;
  alignas(64) float sc[16], off[16];
  alignas(64) uint8_t codes[32];
  __m256 s[2], f[2];
  for (int64_t o = begin; o < end; ++o)
    for (int64_t u = 0; u < units; ++u) {
      const uint8_t* unit = w + o * row_bytes + u * Fm::kBytes;
      scales16_of<Fm>(unit, 1, s, f);
      for (int i = 0; i < 2; ++i) {
        _mm256_store_ps(sc + 8 * i, s[i]);
        _mm256_store_ps(off + 8 * i, f[i]);
      }
      for (int64_t j = 0; j < Fm::kUnit / 32; ++j) {
        _mm256_store_si256((__m256i*)codes, Fm::codes32(unit, j));
        for (int i = 0; i < 32; i += V::kLanes) {
          const int64_t g = (32 * j + i) / 16;
          V::store(out + o * K + u * Fm::kUnit + 32 * j + i,
                   V::fmadd(V::uint8_floats(codes + i), V::set1(sc[g]), V::set1(off[g])));
        }
      }
    }
}
