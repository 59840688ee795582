// Activations in one or two int8 parts (split_ref in common.h), one block of 32 at a time, written once over the
// vector width V: per_isa.h puts a copy in every instruction set's namespace, for the integer tiles
// (blocks_tiles.h, int4_tiles.h), which lay the parts out differently. Includes nothing.

// Block x[0, 32) split as split_ref rounds (P = 2) or into q alone (P = 1, r untouched): half h's 16 parts
// go to q[h] and r[h], and totals[h] is the sum over that half of 256 q + r (P = 2) or of q (P = 1).
// Returns d = max|x| / 127.
template <int P>
inline float split_block(const float* x, int8_t* const q[2], int8_t* const r[2], int32_t totals[2]) {
  typename V::F m = V::zero();
  for (int i = 0; i < 32; i += V::kLanes) m = V::abs_max(m, V::load(x + i));
  const float amax = V::max(m), inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int h = 0; h < 2; ++h) {
    totals[h] = 0;
    for (int i = 0; i < 16; i += V::kLanes) {
      const typename V::F xv = V::load(x + 16 * h + i), iv = V::set1(inv);
      const typename V::I whole = V::round(V::mul(xv, iv));
      V::store_int8(q[h] + i, whole);
      if constexpr (P == 2) {
        const typename V::F frac = V::fmsub(xv, iv, V::to_float(whole));  // x inv - q, one rounding
        const typename V::I rest = V::clamp_int8(V::round(V::mul(frac, V::set1(256.f))));
        V::store_int8(r[h] + i, rest);
        totals[h] += 256 * V::sum(whole) + V::sum(rest);
      } else {
        totals[h] += V::sum(whole);
      }
    }
  }
  return amax / 127.f;
}
