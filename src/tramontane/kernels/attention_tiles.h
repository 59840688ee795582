// Decode attention over float32 keys and values (attention.cpp), written once over the vector width V:
// per_isa.h compiles this file once per instruction set. Includes nothing: attention.cpp has what it
// needs in scope.
//
// One part of one (row, kv head): the group's `rep` query heads (rotated and scaled, q [rep, D]) against
// the keys of blocks table[j0, j1) (the first `scan` slots of each) that the position mask lets through.
// Each key and value vector is loaded once for all the heads that share it. Out: per head the largest
// score m, the sum l of exp(score - m), and o = sum of exp(score - m) * value, unnormalised: parts of one
// row are combined afterwards (the split that keeps both cores busy when a step has few kv heads).
inline void attend_part(const float* q, int64_t rep, int64_t D, const float* kc, const float* vc, const int64_t* kp,
                        const int64_t* table, int64_t j0, int64_t j1, int64_t S, int64_t scan, int64_t KV, int64_t g,
                        int64_t qn, int64_t window, float* scores, float* m, float* l, float* o) {
  const int64_t n = (j1 - j0) * scan;
  for (int64_t r = 0; r < rep; ++r) m[r] = -INFINITY;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t* pos = kp + table[j] * S;
    const float* kb = kc + (table[j] * KV + g) * S * D;
    for (int64_t t = 0; t < scan; ++t) {
      const int64_t at = (j - j0) * scan + t, p = pos[t];
      if (p < 0 || p > qn || (window > 0 && p <= qn - window)) {
        for (int64_t r = 0; r < rep; ++r) scores[r * n + at] = -INFINITY;
        continue;
      }
      const float* k = kb + t * D;
      typename V::F acc[kMaxRep];
      for (int64_t r = 0; r < rep; ++r) acc[r] = V::zero();
      for (int64_t d = 0; d < D; d += V::kLanes) {
        const typename V::F kv = V::load(k + d);
        for (int64_t r = 0; r < rep; ++r) acc[r] = V::fmadd(V::load(q + r * D + d), kv, acc[r]);
      }
      for (int64_t r = 0; r < rep; ++r) {
        const float s = V::sum(acc[r]);
        scores[r * n + at] = s;
        m[r] = std::max(m[r], s);
      }
    }
  }
  for (int64_t r = 0; r < rep; ++r) {
    float sum = 0.f;
    float* sc = scores + r * n;
    for (int64_t i = 0; i < n; ++i) {
      sc[i] = sc[i] == -INFINITY ? 0.f : std::exp(sc[i] - m[r]);
      sum += sc[i];
    }
    l[r] = sum;
    for (int64_t d = 0; d < D; ++d) o[r * D + d] = 0.f;
  }
  for (int64_t j = j0; j < j1; ++j) {
    const float* vb = vc + (table[j] * KV + g) * S * D;
    for (int64_t t = 0; t < scan; ++t) {
      const int64_t at = (j - j0) * scan + t;
      const float* v = vb + t * D;
      for (int64_t d = 0; d < D; d += V::kLanes) {
        const typename V::F vv = V::load(v + d);
        for (int64_t r = 0; r < rep; ++r) {
          const float w = scores[r * n + at];
          if (w != 0.f) V::store(o + r * D + d, V::fmadd(V::set1(w), vv, V::load(o + r * D + d)));
        }
      }
    }
  }
}
