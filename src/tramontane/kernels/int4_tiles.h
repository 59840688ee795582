// The int4 kernels (int4.cpp), written once over the vector width V: per_isa.h compiles this file once
// per instruction set. Includes nothing: int4.cpp has what it needs in scope, per_isa.h the activations'
// split (split_tiles.h).
//
// A step takes V::kInt4Blocks blocks of 32 (one for 256-bit vectors, two for 512): their bytes widen to
// nibbles [low nibbles, high nibbles], so x is stored in that order (QuantizedX), and each dot lane
// covers 4 elements of one block (V::by_block spreads the blocks' factors to their lanes).

// One row of x in P int8 parts per element (split_block, split_tiles.h), laid out by groups of
// V::kInt4Blocks blocks as the nibbles come; the blocks after the last whole group in natural order.
template <int P>
inline void int4_quantize_row(const float* x, int64_t K, int8_t* q, int8_t* r, float* s, int32_t* bias,
                              float* sums) {
  constexpr int64_t G = V::kInt4Blocks;
  const int64_t nb = K / 32, grouped = nb / G * G;
  for (int64_t b = 0; b < nb; ++b) {
    // half h of block b: half h of the group's halves, block b % G among them
    int64_t at[2];
    for (int h = 0; h < 2; ++h) at[h] = b < grouped ? b / G * 32 * G + h * 16 * G + b % G * 16 : 32 * b + 16 * h;
    int8_t* const qs[2] = {q + at[0], q + at[1]};
    int8_t* const rs[2] = {r ? r + at[0] : nullptr, r ? r + at[1] : nullptr};
    int32_t totals[2];
    const float d = split_block<P>(x + 32 * b, qs, rs, totals);
    s[b] = part_step<P>(d);
    sums[b] = part_step<P>(d) * float(totals[0] + totals[1]);
  }
  for (int64_t j = 0; j < K / 4; ++j) {
    int32_t four = 0;
    for (int64_t i = 4 * j; i < 4 * j + 4; ++i) four += P == 2 ? 256 * q[i] + r[i] : q[i];
    bias[j] = -8 * four;
  }
}

// A tile of R weight rows x T rows of x. Per chunk of 16 blocks: each row's scales times x's, and the
// minimums' terms (min * sum(x)) straight into the accumulators. Per step: the weight bytes widened once
// and used for every row of x, their dot with x's first part shifted by 8 bits and continued with the
// second; the -8 of symmetric codes is in the second dot's starting value.
template <int R, int T, int P>
inline void int4_tile(const QuantizedX<P>& qx, int64_t K, const uint8_t* w, const uint16_t* wscale, const uint16_t* wmin,
                      int64_t group, float* y, int64_t N, int64_t o, int64_t m0) {
  constexpr int64_t G = V::kInt4Blocks;
  const int64_t nb = K / 32, groups = K / group, row_bytes = K / 2;
  const NextTile<R> next(w, row_bytes, o, N, m0), next_scales(wscale, groups * 2, o, N, m0),
      next_mins(wmin ? wmin : wscale, groups * 2, o, N, m0);
  alignas(64) float cs[R][T][16];
  typename V::F acc[R][T];
  float lone[R][T] = {};  // the last block of a row with an odd count, for G = 2
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = V::zero();
  for (int64_t c0 = 0; c0 < nb; c0 += 16) {
    const int64_t cn = std::min<int64_t>(16, nb - c0);
    for (int r = 0; r < R; ++r) {
      __m256 ws[2], mn[2];
      block_halves(wscale + (o + r) * groups, c0, cn, group, ws);
      if (wmin) block_halves(wmin + (o + r) * groups, c0, cn, group, mn);
      for (int t = 0; t < T; ++t)
        for (int i = 0; i < 16 / V::kLanes; ++i) {
          const int64_t at = (m0 + t) * nb + c0 + i * V::kLanes, left = cn - i * V::kLanes;
          V::store(cs[r][t] + i * V::kLanes, V::mul(V::of16(ws, i), V::load_partial(qx.sp + at, left)));
          if (wmin) acc[r][t] = V::fmadd(V::of16(mn, i), V::load_partial(qx.sum_p + at, left), acc[r][t]);
        }
    }
    next_scales.at(c0 * 2);
    if (wmin) next_mins.at(c0 * 2);
    const int64_t grouped_end = c0 + cn / G * G;
    for (int64_t b = c0; b < grouped_end; b += G) {
      next.at(b * 16);
      typename V::I wv[R];
      for (int r = 0; r < R; ++r) wv[r] = V::int4_nibbles(w + (o + r) * row_bytes + b * 16);
      for (int t = 0; t < T; ++t) {
        const typename V::I xq = V::loadi(qx.qp + (m0 + t) * K + b * 32);
        const typename V::I bv = wmin ? V::zero_int() : V::loadi(qx.bp + (m0 + t) * (K / 4) + b * 8);
        if constexpr (P == 2) {
          const typename V::I xr = V::loadi(qx.rp + (m0 + t) * K + b * 32);
          for (int r = 0; r < R; ++r) {
            const typename V::I whole = V::template dot<4>(V::zero_int(), wv[r], xq);
            const typename V::I d = V::template dot<4>(V::add(V::times256(whole), bv), wv[r], xr);
            acc[r][t] = V::fmadd(V::to_float(d), V::by_block(&cs[r][t][b - c0]), acc[r][t]);
          }
        } else {
          for (int r = 0; r < R; ++r) {
            const typename V::I d = V::template dot<4>(bv, wv[r], xq);
            acc[r][t] = V::fmadd(V::to_float(d), V::by_block(&cs[r][t][b - c0]), acc[r][t]);
          }
        }
      }
    }
    for (int64_t b = grouped_end; b < c0 + cn; ++b)  // at most one block, in natural order
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t)
          lone[r][t] += float(int4_block_dot<P>(w + (o + r) * row_bytes + b * 16, qx.qp + (m0 + t) * K + b * 32,
                                                P == 2 ? qx.rp + (m0 + t) * K + b * 32 : nullptr, wmin ? 0 : 8)) *
                        cs[r][t][b - c0];
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[(m0 + t) * N + o + r] = V::sum(acc[r][t]) + lone[r][t];
}

template <int P>
inline void int4_rows(const QuantizedX<P>& qx, int64_t M, int64_t K, const uint8_t* w, const uint16_t* wscale,
                      const uint16_t* wmin, int64_t group, float* y, int64_t N, int64_t begin, int64_t end) {
  walk(M, begin, end, DISPATCH_TILE(int4_tile, qx, K, w, wscale, wmin, group, y, N));
}

// ------------------------------------------------------------------------ rows interleaved by eights
// The same products over weights repacked at load (int4.cpp's interleaved layout, R8Rows, as llama.cpp's
// Q4_0 8x8 repack and ik_llama.cpp's _R8 formats): per group of 8 rows and block of 32, 128 bytes of
// nibbles, bytes 8p..8p+7 (half p) of each of the 8 rows one after another, and for Q5_0 / Q5_1 the 8
// rows' fifth bits (Q8_0: its codes, elements [0, 16) then [16, 32) alike). A vector of codes then holds
// all 8 rows (two 256-bit vectors: four each), and its 64-bit lanes pair with 8 elements of x repeated (a
// broadcast load, x in natural order), so a dot product gives two int32 lanes per row: no per-row factor
// set-up and no horizontal sums, where the row layout pays both per row. Each row's dots keep their two lanes, scaled in place, until the tile's end
// folds them into the 8 rows' outputs, one 256-bit float vector.

// One row of x: per block its P parts in natural order, the step, the parts' sum (256 q + r, or q: times
// a symmetric format's code offset, what its codes' dot must lose) and x's sum as the parts hold it.
template <int P>
inline void r8_quantize_row(const float* x, int64_t K, int8_t* q, int8_t* r, float* s, int32_t* parts_sum, float* sums) {
  for (int64_t b = 0; b < K / 32; ++b) {
    int8_t* const qs[2] = {q + 32 * b, q + 32 * b + 16};
    int8_t* const rs[2] = {r ? r + 32 * b : nullptr, r ? r + 32 * b + 16 : nullptr};
    int32_t totals[2];
    const float d = split_block<P>(x + 32 * b, qs, rs, totals);
    s[b] = part_step<P>(d);
    parts_sum[b] = totals[0] + totals[1];
    sums[b] = part_step<P>(d) * float(totals[0] + totals[1]);
  }
}

// Blocks ahead that a tile's first pass over x asks for: the rows are one stream, but the hardware
// prefetcher alone left a 7B-shaped product well under the read rate (benchmarks/projections.py).
constexpr int64_t kR8Ahead = 48;

// The dot of one block's codes (kVecs vectors of 8 rows' halves) with x's 32 parts at xp, per slot.
template <int kVecs, int kBits>
VEC_INLINE void r8_dot(const typename V::I lo[kVecs], const typename V::I hi[kVecs], const int8_t* xp,
                       typename V::I d[V::kR8Slots]) {
  for (int v = 0; v < kVecs; ++v) {
    const int half = v / V::kR8Slots, slot = v % V::kR8Slots;
    d[slot] = V::template dot_pair<kBits>(d[slot], lo[v], V::bcast8(xp + 8 * half), hi[v], V::bcast8(xp + 16 + 8 * half));
  }
}

// Eight interleaved weight rows [8 g, 8 g + 8) x T rows of x from m0, codes of kBits bits (R8Rows).
template <int T, int P, int kBits>
inline void r8_tile(const QuantizedX<P>& qx, const R8Rows& rows, float* y, int64_t N, int64_t g, int64_t m0) {
  constexpr int kVecs = 128 / V::kBytes;
  const int64_t nb = rows.K / 32, block_bytes = rows.block_bytes();
  __m256 min_terms[T];                 // per row: the minimums' terms
  typename V::F sums[T][V::kR8Slots];  // per row's two dot lanes (V::row_pairs): the scaled dots
  for (int t = 0; t < T; ++t) {
    min_terms[t] = _mm256_setzero_ps();
    for (int i = 0; i < V::kR8Slots; ++i) sums[t][i] = V::zero();
  }
  for (int64_t b = 0; b < nb; ++b) {
    const R8Rows::Block blk = rows.at(g, b);
    if (m0 == 0)  // a group's blocks, and the next group's, are one stream
      for (int64_t at = 0; at < block_bytes; at += 64)
        _mm_prefetch((const char*)blk.codes + kR8Ahead * block_bytes + at, _MM_HINT_T0);
    typename V::I lo[kVecs], hi[kVecs];  // elements [8 half, + 8) and [16 + 8 half, + 8) of the rows
    for (int v = 0; v < kVecs; ++v) {
      if constexpr (kBits == 8) {  // int8 codes, made unsigned (the offset takes the 128 back)
        lo[v] = V::flip_signs(V::loadi(blk.codes + v * V::kBytes));
        hi[v] = V::flip_signs(V::loadi(blk.codes + 128 + v * V::kBytes));
        continue;
      }
      const typename V::I packed = V::loadi(blk.codes + v * V::kBytes);
      lo[v] = V::low_nibbles(packed);
      hi[v] = V::high_nibbles(packed);
      if constexpr (kBits == 5) {  // its rows' bytes `half` (low nibbles) and 2 + half (high) of the bits [byte][row]
        lo[v] = V::with_fifth_bits(lo[v], blk.fifth + v * (V::kBytes / 8));
        hi[v] = V::with_fifth_bits(hi[v], blk.fifth + 16 + v * (V::kBytes / 8));
      }
    }
    // each row's scale in both of its dot lanes: the dots stay in their lanes until the tile's end, where
    // one fold per row of x sums them (folding and converting per block took 5 of a block's 18
    // operations per row of x beside its 8 dot products with AVX-512)
    const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)blk.scales));
    typename V::F scales[V::kR8Slots];
    for (int i = 0; i < V::kR8Slots; ++i) scales[i] = V::row_pairs(scale, i);
    for (int t = 0; t < T; ++t) {
      const int64_t at = (m0 + t) * nb + b;
      // the codes' offset (what their dot with x's parts must lose), half in each of a row's two lanes
      const typename V::I offset = V::set1_int(-rows.offset / 2 * qx.bp[at]);
      typename V::I d[V::kR8Slots];
      for (int i = 0; i < V::kR8Slots; ++i) d[i] = P == 2 ? V::zero_int() : offset;
      r8_dot<kVecs, kBits>(lo, hi, qx.qp + at * 32, d);
      if constexpr (P == 2) {  // the second part's dots in a chain of their own, beside the first's
        typename V::I e[V::kR8Slots];
        for (int i = 0; i < V::kR8Slots; ++i) e[i] = offset;
        r8_dot<kVecs, kBits>(lo, hi, qx.rp + at * 32, e);
        for (int i = 0; i < V::kR8Slots; ++i) d[i] = V::add(V::times256(d[i]), e[i]);
      }
      const typename V::F step = V::set1(qx.sp[at]);
      for (int i = 0; i < V::kR8Slots; ++i) sums[t][i] = V::fmadd(V::to_float(d[i]), V::mul(scales[i], step), sums[t][i]);
      if (blk.mins)
        min_terms[t] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)blk.mins)),
                                       _mm256_set1_ps(qx.sum_p[at]), min_terms[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm256_storeu_ps(y + (m0 + t) * N + 8 * g, _mm256_add_ps(min_terms[t], V::fold8(sums[t])));
}

template <int P, int kBits>
inline void r8_groups(const QuantizedX<P>& qx, int64_t M, const R8Rows& rows, float* y, int64_t N, int64_t begin,
                      int64_t end) {
  for (int64_t g = begin; g < end; ++g)
    for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
      switch (std::min(kTileM, M - m0)) {
        case 1: r8_tile<1, P, kBits>(qx, rows, y, N, g, m0); break;
        case 2: r8_tile<2, P, kBits>(qx, rows, y, N, g, m0); break;
        case 3: r8_tile<3, P, kBits>(qx, rows, y, N, g, m0); break;
        default: r8_tile<4, P, kBits>(qx, rows, y, N, g, m0);
      }
    }
}

// Groups of 8 rows [begin, end).
template <int P>
inline void r8_rows(const QuantizedX<P>& qx, int64_t M, const R8Rows& rows, float* y, int64_t N, int64_t begin, int64_t end) {
  switch (rows.bits) {
    case 8: return r8_groups<P, 8>(qx, M, rows, y, N, begin, end);
    case 5: return r8_groups<P, 5>(qx, M, rows, y, N, begin, end);
    default: return r8_groups<P, 4>(qx, M, rows, y, N, begin, end);
  }
}
