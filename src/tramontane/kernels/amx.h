// AMX tiles for quantized weights times several rows of fp32 activations (Intel CPUs with AMX-BF16): the
// tile loop, written once over a weight format's `Rows` (see below); amx.cpp has int4 and int8 rows,
// blocks.cpp the GGUF block formats.
//
// With several rows of x (batched decode), the vector kernels pay a dot product (and for int4 a convert
// and a scale multiply) per block *per row of x*, and the vector ports become the limit, not memory.
// Here a block of 32 weights of a row is decoded once, to bf16, and one TDPBF16PS multiplies 16 weight
// rows by up to 16 rows of x:
//
//   A tile: 16 weight rows x one block of 32 weights, bf16, as the format decodes them.
//   B tile: the block's 32 activations of up to 16 rows of x, bf16, laid out as TDPBF16PS expects:
//           row p holds the pairs (x[m][k(2p)], x[m][k(2p + 1)]) for m = 0, 1, ..., where k is the order in
//           which the weight format decodes a block.
//   C tile: 16 weight rows x up to 16 rows of x, fp32, summed over every block of the row.
//
// Two groups of 16 weight rows share each B tile, and a second chunk of 16 rows of x uses a second B
// tile: 4 C + 2 A + 2 B = the 8 tile registers. Beyond 32 rows of x (prefill) a unit's decoded blocks
// are kept and reused by each further pair of chunks, which makes this faster than dequantizing to a
// bf16 GEMM (benchmarks/dot_rates.py).
//
// What the tile loop needs of a weight format (`Rows`): `w` and `row_bytes` (to prefetch), `K`, the
// input k_of(t) that it decodes to position t of a block (x is packed in the same order), `prepare`
// before block b of a 16-row group is decoded, `decode` of block b into bf16 A-tile rows (rows past
// `rows` zero), the side arrays of a unit to prefetch, and the factor of each output row.
//
// The operating system must grant each process the tile state: Linux does through arch_prctl, once
// (amx_available).
#pragma once

#include "common.h"

#include <cstdlib>
#include <memory>
#include <vector>

// What amx.cpp defines. AMX tiles for int4 and int8 products from these many rows of x (below, the vector
// kernels win; the GGUF block formats' counts are block_amx_min_rows): whether the CPU and the operating
// system allow them, and whether they are in use. In use implies the AVX-512 path: set_isa sets both
// (tests turn AMX off with set_isa("avx512")).
bool amx_available();
constexpr int64_t kAmxMinRowsInt4 = 5, kAmxMinRowsInt8 = 4;
inline bool& amx_in_use() {
  static bool on = amx_available();
  return on;
}
void int4_linear_amx(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* wscale,
                     const uint16_t* wmin, int64_t group, float* y, int64_t N);
void int8_linear_amx(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, float* y, int64_t N);

#if defined(TRAMONTANE_X86) && defined(__linux__)
#define TRAMONTANE_AMX 1
// AMX CPUs have AVX-512 VNNI too: the block formats' code readers (blocks.cpp) are written for it
#define TAMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma,f16c")))
#endif

#ifdef TRAMONTANE_AMX
namespace amx {
struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// x in chunks of up to 16 rows, each as B tiles: for chunk c, xb[c][b][p][m][j] = bf16(x[16 c + m][32 b + k(2 p + j)]),
// [K/32, 16, mc, 2] with mc = the chunk's rows, where k(t) is the input a weight format decodes to position t of
// a block (Rows::k_of).
struct PackedX {
  std::vector<std::unique_ptr<uint16_t[]>> xb;  // uninitialised: every element is written
  std::vector<int64_t> mc;
  template <typename KOf>
  TAMX PackedX(const float* x, int64_t M, int64_t K, KOf k_of) {
    alignas(64) int32_t k[32];
    for (int t = 0; t < 32; ++t) k[t] = int32_t(k_of(t));
    // positions 0-15 and 16-31 of a block, each from either half of its 32 inputs
    const __m512i first = _mm512_load_si512(k), second = _mm512_load_si512(k + 16);
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
      const int64_t mc_ = std::min<int64_t>(16, M - m0);
      std::unique_ptr<uint16_t[]> xt(new uint16_t[size_t(K * mc_)]);
      // dword p of a block's tile holds row m's pair p at p * mc + m
      const __m512i pairs = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(int32_t(mc_)));
      for (int64_t b = 0; b < K / 32; ++b) {
        int32_t* tile = reinterpret_cast<int32_t*>(xt.get() + b * 32 * mc_);
        for (int64_t m = 0; m < mc_; ++m) {
          const float* src = x + (m0 + m) * K + b * 32;
          const __m512 lo = _mm512_loadu_ps(src), hi = _mm512_loadu_ps(src + 16);
          const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_permutex2var_ps(lo, second, hi),
                                                 _mm512_permutex2var_ps(lo, first, hi));
          _mm512_i32scatter_epi32(tile + m, pairs, (__m512i)v, 4);
        }
      }
      xb.push_back(std::move(xt));
      mc.push_back(mc_);
    }
  }
  const uint16_t* tile(int64_t c, int64_t b) const {
    return xb[size_t(c)].get() + b * 32 * mc[size_t(c)];
  }
};

// Tiles 0-3: C (x chunk c, weight group g) at 2 c + g; 4, 5: A of groups 0, 1; 6, 7: B of chunks 0, 1.
TAMX inline void configure(int64_t mc0, int64_t mc1) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16;
  const uint16_t c0 = uint16_t(mc0 * 4), c1 = uint16_t(mc1 ? mc1 * 4 : 4);  // mc fp32s or bf16 pairs per row
  cfg.colsb[0] = cfg.colsb[1] = cfg.colsb[6] = c0;
  cfg.colsb[2] = cfg.colsb[3] = cfg.colsb[7] = c1;
  cfg.colsb[4] = cfg.colsb[5] = 64;
  _tile_loadconfig(&cfg);
}

// A per-thread buffer for the decoded A tiles of a whole 32-row unit, reused by every pair of x chunks.
inline uint16_t* unit_buffer(size_t elements) {
  thread_local std::unique_ptr<uint16_t[], void (*)(void*)> buf(nullptr, std::free);
  thread_local size_t size = 0;
  if (size < elements) {
    buf.reset(static_cast<uint16_t*>(std::aligned_alloc(64, elements * 2)));
    TORCH_CHECK(buf, "out of memory for a ", elements * 2, "-byte AMX tile buffer");
    size = elements;
  }
  return buf.get();
}

// y[m, o] for output rows o in [begin, end), in units of 32 (two A groups), and every row m of x, in
// pairs of 16-row chunks (two B tiles). With one pair (decode), each block is decoded into a small ring
// just before its product; with more (prefill), a unit's blocks are decoded once, on the first pair.
template <typename Rows>
TAMX void amx_rows(const PackedX& px, Rows wt, float* y, int64_t N, int64_t begin, int64_t end) {
  const int64_t nb = wt.K / 32, row_bytes = wt.row_bytes, chunks = int64_t(px.mc.size());
  // the next unit's rows are prefetched line by line, the lines spread evenly over this unit's blocks
  const int64_t lines = (row_bytes + 63) / 64;
  alignas(64) uint16_t ring[2][2][16 * 32];  // [block parity][group]: written while the other is in use
  uint16_t* unit = chunks > 2 ? unit_buffer(size_t(nb * 2 * 16 * 32)) : nullptr;
  alignas(64) float cbuf[16 * 16];
  int64_t configured = -1;  // the chunk pair the tile configuration was loaded for
  for (int64_t o = begin; o < end; o += 32) {
    const int64_t rows0 = std::min<int64_t>(16, end - o), rows1 = std::min<int64_t>(16, std::max<int64_t>(0, end - o - 16));
    const int64_t next = o + 32, next_rows = std::min<int64_t>(32, std::max<int64_t>(0, end - next));
    wt.prefetch_side(next, next_rows);
    for (int64_t c = 0; c < chunks; c += 2) {
      const int64_t mc0 = px.mc[size_t(c)], mc1 = c + 1 < chunks ? px.mc[size_t(c + 1)] : 0;
      // configurations differ only in the last pair's columns (and loading one zeroes every tile)
      const int64_t shape = mc0 * 32 + mc1;
      if (shape != configured) configure(mc0, mc1), configured = shape;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t b = 0; b < nb; ++b) {
        uint16_t* a0 = unit ? unit + b * 2 * 512 : ring[b & 1][0];
        uint16_t* a1 = a0 + 512;
        if (c == 0) {
          for (int64_t l = b * lines / nb; l < (b + 1) * lines / nb; ++l)
            for (int64_t r = 0; r < next_rows; ++r)
              _mm_prefetch((const char*)(wt.w) + (next + r) * row_bytes + l * 64, _MM_HINT_T1);
          wt.prepare(0, o, rows0, b);
          wt.prepare(1, o + 16, rows1, b);
          wt.decode(0, o, rows0, b, a0);
          wt.decode(1, o + 16, rows1, b, a1);
        }
        _tile_loadd(4, a0, 64);
        _tile_loadd(5, a1, 64);
        _tile_loadd(6, px.tile(c, b), mc0 * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (mc1) {
          _tile_loadd(7, px.tile(c + 1, b), mc1 * 4);
          _tile_dpbf16ps(2, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      // C tile (chunk k, group g) holds y rows 16 k + m, columns o + 16 g + r, at cbuf[r * mc + m]
      auto drain = [&](int64_t k, int64_t g, int64_t rows) TAMX {
        const int64_t mc = px.mc[size_t(k)];
        for (int64_t r = 0; r < rows; ++r) {
          const float f = wt.row_factor(o + 16 * g + r);
          for (int64_t m = 0; m < mc; ++m) y[(16 * k + m) * N + o + 16 * g + r] = cbuf[r * mc + m] * f;
        }
      };
      _tile_stored(0, cbuf, mc0 * 4);
      drain(c, 0, rows0);
      _tile_stored(1, cbuf, mc0 * 4);
      drain(c, 1, rows1);
      if (mc1) {
        _tile_stored(2, cbuf, mc1 * 4);
        drain(c + 1, 0, rows0);
        _tile_stored(3, cbuf, mc1 * 4);
        drain(c + 1, 1, rows1);
      }
    }
  }
  _tile_release();
}

template <typename Rows>
inline void run(const float* x, int64_t M, const Rows& wt, float* y, int64_t N) {
  const PackedX px(x, M, wt.K, Rows::k_of);
  // tasks of whole 32-row units, enough of them to balance the threads
  const int64_t units = (N + 31) / 32;
  at::parallel_for(0, units, std::max<int64_t>(1, units / (at::get_num_threads() * 8)), [&](int64_t ub, int64_t ue) {
    amx_rows(px, wt, y, N, ub * 32, std::min(N, ue * 32));
  });
}

}  // namespace amx
#endif
