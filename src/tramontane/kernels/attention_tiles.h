// Decode attention over float32, bfloat16 or float16 keys and values (attention.cpp), written once over
// the vector width V: per_isa.h compiles this file once per instruction set. Includes nothing:
// attention.cpp has what it needs in scope.

// V::kLanes stored values at p as floats.
template <typename T>
VEC_INLINE typename V::F load_kv(const T* p) {
  if constexpr (std::is_same_v<T, c10::Half>) return V::load_f16(reinterpret_cast<const uint16_t*>(p));
  else if constexpr (std::is_same_v<T, c10::BFloat16>) return V::load_bf16(reinterpret_cast<const uint16_t*>(p));
  else return V::load(p);
}


// Ask for the D values at p ahead of use: the next block's vector at the same slot. A paged pool's blocks
// of one kv head lie apart (a block of 16 slots is 4 KiB of float32 keys), so the hardware prefetcher
// stops at every block; the contiguous cache is one block, where the next block is none.
template <typename T>
VEC_INLINE void prefetch_kv(const T* p, int64_t D) {
  for (int64_t b = 0; b < D * int64_t(sizeof(T)); b += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T0);
}


// e^x as Cephes' expf computes it (relative error about 1e-7): x = n ln 2 + r with |r| <= ln 2 / 2 (ln 2 in
// two parts, so that n ln 2 is exact), e^r by a polynomial, times 2^n built in the exponent bits. Below
// -87.3, where 2^n leaves float32's normal range, 0 (a masked score is -infinity).
VEC_INLINE typename V::F exp_of(typename V::F x) {
  constexpr float kLow = -87.33654f;
  const typename V::F c = V::clamp(x, kLow, 88.37626f);
  const typename V::I n = V::round(V::mul(c, V::set1(1.44269504088896341f)));
  const typename V::F fn = V::to_float(n);
  typename V::F r = V::fmadd(fn, V::set1(-0.693359375f), c);
  r = V::fmadd(fn, V::set1(2.12194440e-4f), r);
  typename V::F p = V::set1(1.9875691500e-4f);
  p = V::fmadd(p, r, V::set1(1.3981999507e-3f));
  p = V::fmadd(p, r, V::set1(8.3334519073e-3f));
  p = V::fmadd(p, r, V::set1(4.1665795894e-2f));
  p = V::fmadd(p, r, V::set1(1.6666665459e-1f));
  p = V::fmadd(p, r, V::set1(5.0000001201e-1f));
  p = V::fmadd(p, V::mul(r, r), V::add(r, V::set1(1.f)));
  return V::zero_below(V::mul(p, V::pow2(n)), x, kLow);
}

// The scores of the U keys at k (U = 4, or 1 at a part's edges) for the `rep` heads, written at out, one head
// `stride` after another: each key's sum goes through the same transposing tree (V::sum4), so a key's score
// never depends on which keys share its group.
template <int U, typename T>
VEC_INLINE void score_keys(const float* q, int64_t rep, int64_t D, const T* k, float* out, int64_t stride) {
  static_assert(U == 1 || U == 4, "keys come four at a time, or one");
  typename V::F acc[kMaxRep][U];
  for (int64_t r = 0; r < rep; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = V::zero();
  for (int64_t d = 0; d < D; d += V::kLanes)
    for (int u = 0; u < U; ++u) {
      const typename V::F kv = load_kv(k + u * D + d);
      for (int64_t r = 0; r < rep; ++r) acc[r][u] = V::fmadd(V::load(q + r * D + d), kv, acc[r][u]);
    }
  for (int64_t r = 0; r < rep; ++r) {
    const __m128 sums = V::sum4(acc[r][0], acc[r][std::min(1, U - 1)], acc[r][std::min(2, U - 1)], acc[r][U - 1]);
    if constexpr (U == 4) _mm_storeu_ps(out + r * stride, sums);
    else out[r * stride] = _mm_cvtss_f32(sums);
  }
}

// Scores per head are kept `stride` apart: the part's slot count rounded up to whole vectors.
inline int64_t score_stride(int64_t n) { return (n + V::kLanes - 1) / V::kLanes * V::kLanes; }

// One part of one (row, kv head): the group's `rep` query heads (rotated and scaled, q [rep, D]) against
// the keys at flat slots [i0, i1) of its blocks (slot i: block table[i / scan], offset i % scan; the first
// `scan` slots of each block) that the position mask lets through. Out: per head the largest score m, the
// sum l of exp(score - m), and o = sum of exp(score - m) * value, unnormalised: parts of one row are
// combined afterwards (the split that keeps both cores busy when a step has few kv heads).
//  - scores: each key vector is loaded once for all the heads that share it, four keys at a time so that
//    one transposing tree gives their four sums per head (score_keys);
//  - weights: exp over whole vectors of scores (`scores` holds rep * score_stride(n) floats);
//  - values: one vector of D per pass, its `rep` sums in registers over every key of the part, so each
//    weighted value is one fused multiply-add (the keys' weights are broadcast from `scores`).
// A masked slot gets weight 0 and its value, finite as every stored or cleared slot is, adds nothing; a
// block with no visible key is skipped. A key's score, and so a row's result, never depends on which
// other keys share its group of four, nor on the other rows of the step.
template <typename T>
inline void attend_part(const float* q, int64_t rep, int64_t D, const T* kc, const T* vc, const int64_t* kp,
                        const int64_t* table, int64_t i0, int64_t i1, int64_t S, int64_t scan, int64_t KV, int64_t g,
                        int64_t qn, int64_t window, float* scores, float* m, float* l, float* o) {
  const int64_t n = i1 - i0, stride = score_stride(n);
  const int64_t j1 = (i1 + scan - 1) / scan;  // past the last block of the part
  const auto masked = [&](int64_t p) { return p < 0 || p > qn || (window > 0 && p <= qn - window); };
  bool live[kPartSlots + 1];  // per block of the part: whether any of its keys is visible
  for (int64_t j = i0 / scan; j < j1; ++j) {
    const int64_t* pos = kp + table[j] * S;
    const T* kb = kc + (table[j] * KV + g) * S * D;
    const T* next = j + 1 < j1 ? kc + (table[j + 1] * KV + g) * S * D : nullptr;
    const int64_t t0 = std::max<int64_t>(0, i0 - j * scan), t1 = std::min(scan, i1 - j * scan);
    bool any = false;
    for (int64_t t = t0; t < t1 && !any; ++t) any = !masked(pos[t]);
    live[j - i0 / scan] = any;
    if (!any) {  // a block wholly outside the window or past the row's position (a shorter row's padding)
      for (int64_t r = 0; r < rep; ++r)
        for (int64_t t = t0; t < t1; ++t) scores[r * stride + j * scan + t - i0] = -INFINITY;
      continue;
    }
    int64_t t = t0;
    for (; t + 4 <= t1; t += 4) {
      if (next)
        for (int u = 0; u < 4; ++u) prefetch_kv(next + (t + u) * D, D);
      score_keys<4>(q, rep, D, kb + t * D, scores + j * scan + t - i0, stride);
    }
    for (; t < t1; ++t) {
      if (next) prefetch_kv(next + t * D, D);
      score_keys<1>(q, rep, D, kb + t * D, scores + j * scan + t - i0, stride);
    }
    for (t = t0; t < t1; ++t)
      if (masked(pos[t]))
        for (int64_t r = 0; r < rep; ++r) scores[r * stride + j * scan + t - i0] = -INFINITY;
  }
  for (int64_t r = 0; r < rep; ++r) {
    float* sc = scores + r * stride;
    for (int64_t i = n; i < stride; ++i) sc[i] = -INFINITY;
    typename V::F top = V::set1(-INFINITY);
    for (int64_t i = 0; i < stride; i += V::kLanes) top = V::max(top, V::load(sc + i));
    m[r] = V::max(top);
    if (m[r] == -INFINITY) {  // every key of the part masked (for every head): the combination skips the part
      l[r] = 0.f;
      continue;
    }
    typename V::F total = V::zero();
    const typename V::F shift = V::set1(m[r]);
    for (int64_t i = 0; i < stride; i += V::kLanes) {
      const typename V::F w = exp_of(V::fmsub(V::load(sc + i), V::set1(1.f), shift));
      V::store(sc + i, w);
      total = V::add(total, w);
    }
    l[r] = V::sum(total);
  }
  for (int64_t d = 0; d < D; d += V::kLanes) {
    typename V::F acc[kMaxRep];
    for (int64_t r = 0; r < rep; ++r) acc[r] = V::zero();
    for (int64_t j = i0 / scan; j < j1; ++j) {
      if (!live[j - i0 / scan]) continue;
      const T* vb = vc + (table[j] * KV + g) * S * D + d;
      const T* next = d == 0 && j + 1 < j1 ? vc + (table[j + 1] * KV + g) * S * D : nullptr;
      for (int64_t t = std::max<int64_t>(0, i0 - j * scan); t < std::min(scan, i1 - j * scan); ++t) {
        if (next) prefetch_kv(next + t * D, D);
        const typename V::F vv = load_kv(vb + t * D);
        const float* w = scores + j * scan + t - i0;
        for (int64_t r = 0; r < rep; ++r) acc[r] = V::fmadd(V::set1(w[r * stride]), vv, acc[r]);
      }
    }
    for (int64_t r = 0; r < rep; ++r) V::store(o + r * D + d, acc[r]);
  }
}
