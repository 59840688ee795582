// What the kernel files share: instruction-set choice, thread grain, argument checks and the tiling walk.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TRAMONTANE_X86 1
#define T256 __attribute__((target("avx2,fma,f16c")))
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#endif

// The vector kernels' instruction sets, best last: AVX-512 (F/BW/VL/DQ with VNNI), AVX2 with AVX-VNNI,
// AVX2 alone (with FMA and F16C), portable C++. A CPU with AVX-512 but no VNNI (Skylake-SP) takes AVX2.
enum class Isa { kRef, kAvx2, kAvxVnni, kAvx512 };

inline Isa detect_isa() {
#ifdef TRAMONTANE_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni"))
    return Isa::kAvx512;
  if (avx2 && __builtin_cpu_supports("avxvnni")) return Isa::kAvxVnni;
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kRef;
}

// AVX-VNNI (the VEX dot products, 256 bits), which some AVX-512 VNNI CPUs lack (Ice Lake, Cascade Lake).
inline bool avx_vnni_available() {
#ifdef TRAMONTANE_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avxvnni");
#else
  return false;
#endif
}

// The path in use: the best this CPU has, unless a test forces a lower one with set_isa.
inline Isa& current_isa() {
  static Isa isa = detect_isa();
  return isa;
}


// Activations for the integer kernels, in two int8 parts per element: per block of 32, step d = max|x| /
// 127, inv = 127 / max|x|, q = round(x inv) and r = round(256 fma(x, inv, -q)) saturated to int8 ([-128,
// 127], as the vector stores saturate); x = d (q + r / 256) to within d / 512. The fma is explicit in
// every path, so no compiler's contraction choice changes a tie. A product is then (dot(w, q) << 8) +
// dot(w, r), times d / 256. With one part (llama.cpp's Q8 rounding) x = d q to within d / 2 and a
// product is dot(w, q) times d: half the dot products, less exact (`activation_parts` says which; the
// kernel policy chooses, kernels/policy.py).
inline void split_ref(float x, float inv, int8_t& q, int8_t& r) {
  const float whole = std::nearbyint(x * inv);
  q = int8_t(whole);
  r = int8_t(std::max(-128.f, std::min(127.f, std::nearbyint(std::fma(x, inv, -whole) * 256.f))));
}

// The int8 parts per element of the integer kernels' activations, 1 or 2 (see split_ref), for every
// product of the process; set_activation_parts changes it.
inline int& activation_parts() {
  static int parts = 2;
  return parts;
}

// Block x[0, 32) split as split_ref rounds (P = 2 parts) or into q alone (P = 1; r untouched), in natural
// order into q and r [32]; totals[h] is the sum over half h of 16 of 256 q + r (P = 2) or of q (P = 1).
// Returns d = max|x| / 127. (The vector paths: split_tiles.h.)
template <int P>
inline float split_block_ref(const float* x, int8_t* q, int8_t* r, int32_t totals[2]) {
  float amax = 0.f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int h = 0; h < 2; ++h) {
    totals[h] = 0;
    for (int i = 16 * h; i < 16 * h + 16; ++i) {
      if constexpr (P == 2) {
        split_ref(x[i], inv, q[i], r[i]);
        totals[h] += 256 * q[i] + r[i];
      } else {
        q[i] = int8_t(std::nearbyint(x[i] * inv));
        totals[h] += q[i];
      }
    }
  }
  return amax / 127.f;
}

// One step of x's split in a product: d / 256 (two parts) or d (one part).
template <int P>
constexpr float part_step(float d) {
  return P == 2 ? d / 256.f : d;
}

// Calls fn with std::integral_constant<int, P> for the activation_parts() in use.
template <class Fn>
auto with_parts(Fn fn) {
  if (activation_parts() == 1) return fn(std::integral_constant<int, 1>{});
  return fn(std::integral_constant<int, 2>{});
}

// fp32 values to bf16 bits, rounded to nearest even as at::BFloat16 rounds (the bits Tensor.to(torch.bfloat16)
// gives), NaN to its quiet NaN. Cloned per instruction set, chosen when the library loads (measured faster
// than hand-written AVX-512 and AVX2 loops on Zen 5: 7B prefill's dequantization 1.4 s against 1.8 s).
__attribute__((target_clones("avx512f", "avx2", "default")))
inline void to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, 4);
    const uint16_t rounded = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    dst[i] = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : rounded;
  }
}

// An [N, K] tensor of dequantized rows, fp32 or (`bf16`) bf16, filled in parallel by fill(o, dst), which
// writes row o as fp32 to dst. Bf16 rows go through one fp32 row in cache: memory sees only the bf16
// bytes, half of fp32's, and no second pass converts them.
template <class Fill>
at::Tensor dequantized_rows(int64_t N, int64_t K, bool bf16, Fill fill) {
  auto out = at::empty({N, K}, bf16 ? at::kBFloat16 : at::kFloat);
  float* fp = bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* bp = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(bf16 ? K : 0);
    for (int64_t o = begin; o < end; ++o) {
      if (!bf16) {
        fill(o, fp + o * K);
        continue;
      }
      fill(o, row.data());
      to_bf16(row.data(), bp + o * K, K);
    }
  });
  return out;
}

// A run [front, back) of pieces that its owner takes from the front and others from the back, one at a
// time, in one atomic word (front in the high 32 bits).
class SharedPieces {
 public:
  void reset(int64_t front, int64_t back) { v_.store(uint64_t(front) << 32 | uint64_t(back)); }
  // The next piece from the front (or the back) into p; false once none is left.
  bool take(bool from_back, int64_t& p) {
    uint64_t v = v_.load();
    for (;;) {
      const int64_t front = int64_t(v >> 32), back = int64_t(v & 0xFFFFFFFFu);
      if (front >= back) return false;
      p = from_back ? back - 1 : front;
      const uint64_t next = from_back ? uint64_t(front) << 32 | uint64_t(p) : uint64_t(p + 1) << 32 | uint64_t(back);
      if (v_.compare_exchange_weak(v, next)) return true;
    }
  }

 private:
  std::atomic<uint64_t> v_{0};
};

// fn(begin, end) over [0, n) in pieces [p * piece, (p + 1) * piece): each thread walks its own run of
// pieces from the front, then takes what is left of the others' runs from their back. Fixed shares alone
// (ATen's parallel_for) let a thread that loses its core for a while (to the server's event loop, or any
// other process on a small machine) hold up the whole step at each of its ~180 parallel regions; pieces
// handed out in turn instead break each thread's stream through the weights (15% slower decoding of
// SmolLM2, the hardware prefetcher restarting at every piece). The pieces never depend on timing, so
// neither do the register tiles a row falls in, nor its bits.
template <class Fn>
void parallel_pieces(int64_t n, int64_t piece, const Fn& fn) {
  const int64_t pieces = (n + piece - 1) / piece, threads = std::min<int64_t>(pieces, at::get_num_threads());
  if (threads <= 1) {
    if (n > 0) fn(int64_t(0), n);
    return;
  }
  std::vector<SharedPieces> runs(threads);
  for (int64_t t = 0; t < threads; ++t) runs[t].reset(pieces * t / threads, pieces * (t + 1) / threads);
  at::parallel_for(0, threads, 1, [&](int64_t t, int64_t) {
    int64_t p;
    for (int64_t i = 0; i < threads; ++i)  // its own run first (i = 0), then the others' from their back
      while (runs[(t + i) % threads].take(i > 0, p)) fn(p * piece, std::min(n, (p + 1) * piece));
  });
}

inline int64_t grain(int64_t N) {
  // Enough rows per piece to amortise scheduling, few enough to balance the threads; whole register tiles.
  const int64_t threads = at::get_num_threads();
  return std::max<int64_t>(16, (N / (threads * 8) + 7) / 8 * 8);
}

inline void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, ", K, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous float32 CPU tensor");
}

// Register tiles: kRows weight rows x up to kTileM rows of x, one accumulator each. Each weight vector
// is decoded once and used for every row of x; each x vector is loaded once and used for every weight
// row; the independent accumulator chains hide the latency of the multiply-adds.
constexpr int kRows = 4;
constexpr int64_t kTileM = 4;

// Prefetch a whole range (a few lines) into L1.
__attribute__((always_inline)) inline void prefetch_range(const void* p, int64_t bytes) {
#ifdef TRAMONTANE_X86
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
#endif
}

// The next tile's rows, fetched while a tile of R rows at row o computes (on its first pass over x):
// as the tile reaches each new 64-byte line `pos` of its rows, the same line of the R rows after it.
// Rows are short (a few lines for small models), too short for the hardware prefetcher to run ahead
// within one. Spread over the pass rather than requested all at once at its start, the requests do not
// queue up behind the core's few outstanding misses (benchmarks/dot_rates.py measures the read rate).
template <int R>
struct NextTile {
  const char* next;
  int64_t row_bytes;
  bool on;

  NextTile(const void* rows, int64_t row_bytes_, int64_t o, int64_t N, int64_t m0)
      : next(static_cast<const char*>(rows) + (o + R) * row_bytes_), row_bytes(row_bytes_),
        on(m0 == 0 && o + 2 * R <= N) {}

  __attribute__((always_inline)) void at(int64_t pos) const {
#ifdef TRAMONTANE_X86
    if (on && pos % 64 == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch(next + r * row_bytes + pos, _MM_HINT_T0);
#endif
  }
};

#ifdef TRAMONTANE_X86
// 32 bytes: 16 where bit i of the 32-bit word `bits` is set (byte i), else 0.
T256 inline __m256i bit16(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(  // byte i = byte i / 8 of bits
      _mm256_set1_epi32(int(bits)), _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(16));
}

// Lanes [0, n) of the 8 floats at p, the others zero (nothing read past p + n)
T256 inline __m256 floats8(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::max<int64_t>(n, 0))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_ps(p, live);
}

// The float16 values (scales or minimums, one per group of `group` elements) of blocks [b, b + n) of
// one weight row (n <= 16), one per block, as 16 fp32 in two registers, zero past n; `row` points at the
// row's groups. (In registers: a buffer written as two halves and read back whole stalls the read.)
T256 inline void block_halves(const uint16_t* row, int64_t b, int64_t n, int64_t group, __m256 out[2]) {
  if (group == 32) {  // consecutive values: whole loads where 8 remain (no buffer: see above)
    for (int i = 0; i < 2; ++i) {
      const int64_t count = n - 8 * i;
      alignas(16) uint16_t h[8] = {};
      if (count > 0 && count < 8) std::memcpy(h, row + b + 8 * i, count * 2);
      const __m128i* from = count >= 8 ? (const __m128i*)(row + b + 8 * i) : (const __m128i*)h;
      const __m128i v = _mm_loadu_si128(from);
      out[i] = _mm256_cvtph_ps(v);
    }
    return;
  }
  alignas(16) uint16_t h[16] = {};
  const int64_t per = group / 32;  // blocks per group
  for (int64_t i = 0, g = b / per, left = per - b % per; i < n; ++i) {
    h[i] = row[g];
    if (--left == 0) ++g, left = per;
  }
  out[0] = _mm256_cvtph_ps(_mm_load_si128((const __m128i*)h));
  out[1] = _mm256_cvtph_ps(_mm_load_si128((const __m128i*)(h + 8)));
}
#endif

// Walk output rows [begin, end) in tiles of kRows and x rows in tiles of up to kTileM.
template <typename Tile>
inline void walk(int64_t M, int64_t begin, int64_t end, Tile each) {
  for (int64_t o = begin; o < end;) {
    const bool full = o + kRows <= end;
    for (int64_t m0 = 0; m0 < M; m0 += kTileM) each(o, m0, std::min(kTileM, M - m0), full);
    o += full ? kRows : 1;
  }
}

// Instantiate tile<R, T> for T = 1..4 and R in {kRows, 1}.
#define DISPATCH_TILE(FN, ...)                                  \
  [&](int64_t o, int64_t m0, int64_t tm, bool full) {           \
    if (full) {                                                 \
      switch (tm) {                                             \
        case 1: return FN<kRows, 1>(__VA_ARGS__, o, m0);        \
        case 2: return FN<kRows, 2>(__VA_ARGS__, o, m0);        \
        case 3: return FN<kRows, 3>(__VA_ARGS__, o, m0);        \
        default: return FN<kRows, 4>(__VA_ARGS__, o, m0);       \
      }                                                         \
    }                                                           \
    switch (tm) {                                               \
      case 1: return FN<1, 1>(__VA_ARGS__, o, m0);              \
      case 2: return FN<1, 2>(__VA_ARGS__, o, m0);              \
      case 3: return FN<1, 3>(__VA_ARGS__, o, m0);              \
      default: return FN<1, 4>(__VA_ARGS__, o, m0);             \
    }                                                           \
  }
