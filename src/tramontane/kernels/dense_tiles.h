// The fp32 and int8 weight kernels (dense.cpp), written once over the vector width V: per_isa.h
// compiles this file once per instruction set. Includes nothing: dense.cpp has what it needs in scope.
//
// A tile of R weight rows x T rows of x: each weight vector is loaded (int8: and converted to fp32) once
// and used for every row of x, in V::kLanes elements a step; the last K % kLanes elements one by one.
// Int8 rows are multiplied by their scale at the end.
template <int R, int T, typename W>
inline void dense_tile(const float* x, int64_t K, const W* w, const float* scale, float* y, int64_t N, int64_t o,
                       int64_t m0) {
  const NextTile<R> next(w, K * int64_t(sizeof(W)), o, N, m0);
  typename V::F acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = V::zero();
  const int64_t whole = K / V::kLanes * V::kLanes;
  for (int64_t k = 0; k < whole; k += V::kLanes) {
    next.at(k * int64_t(sizeof(W)));
    typename V::F wv[R];
    for (int r = 0; r < R; ++r) {
      if constexpr (sizeof(W) == 1) wv[r] = V::int8_floats(w + (o + r) * K + k);
      else wv[r] = V::load(w + (o + r) * K + k);
    }
    for (int t = 0; t < T; ++t) {
      const typename V::F xv = V::load(x + (m0 + t) * K + k);
      for (int r = 0; r < R; ++r) acc[r][t] = V::fmadd(wv[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      float sum = V::sum(acc[r][t]);
      for (int64_t k = whole; k < K; ++k) sum += float(w[(o + r) * K + k]) * x[(m0 + t) * K + k];
      y[(m0 + t) * N + o + r] = scale ? sum * scale[o + r] : sum;
    }
}

template <typename W>
void dense_rows(const float* x, int64_t M, int64_t K, const W* w, const float* scale, float* y, int64_t N,
                int64_t begin, int64_t end) {
  walk(M, begin, end, DISPATCH_TILE(dense_tile, x, K, w, scale, y, N));
}
