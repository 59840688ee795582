// Int4 weights times fp32 activations, through exact integer dot products.
//
// Weight layout (the bytes of GGUF's Q4_0 / Q4_1 blocks, with the scales kept apart): a row is split
// into blocks of 32 elements stored in 16 bytes; byte i holds q[i] in its low nibble and q[i + 16] in
// its high nibble, q in 0..15. The element is (q - 8) * scale[g] (symmetric, Q4_0), or with a minimum
// per group q * scale[g] + min[g] (Q4_1), float16 scale and min per group g of `group` elements (a
// multiple of 32).
//
// Each call first splits the rows of x into two int8 parts per element in blocks of 32 (split_ref,
// common.h: x = d (q + r / 256), d = max|x| / 127; llama.cpp's Q8_0 activations are q alone, as ours
// are with activation_parts 1, which drops the second dot below). An output
// is then the sum over blocks of scale_w * d / 256 * ((dot(c - 8, q) << 8) + dot(c - 8, r)), the dots in
// integer arithmetic: VNNI's dpbusd (u8 x s8 -> s32) on AVX-512 and AVX-VNNI, maddubs + madd on AVX2
// (int4_tiles.h, written once over the vector width). The -8 is folded in by starting the second dot at
// -8 * (256 q + r) summed (`bias`, precomputed with the activations); a minimum adds min * sum(x) per
// block, sixteen blocks per vector multiply-add. Weight bytes are widened to nibbles once per tile and
// reused for every row of x.
//
// Interleaved layout (`interleaved`; Int4Linear.interleave makes it where the kernel policy says): the
// same bytes and scales, permuted within each group of 8 rows. Per block of 32, 128 bytes: for half
// p = 0, 1 (bytes 8p..8p+7 of a row's 16) the 8 rows' 8 bytes one after another ([block][half][row][8]);
// the scales and minimums of the 8 rows side by side per group ([group][row]). A dot product then gives
// lanes per row (r8_tile), where the row layout pays a factor set-up per row and a horizontal sum:
// on SmolLM2's 576-wide rows that fixed cost was most of the kernel (benchmarks/projections.py).
// GGUF's Q5_0, Q5_1 and Q8_0 rows (5-bit codes: a nibble and a fifth bit; 8-bit codes; one float16 scale
// per block, and for Q5_1 a minimum) interleave alike (gguf_linear.py repacks them; r8_block_linear reads
// them), every piece of a block of 8 rows in one run (R8Rows).

#include "amx.h"
#include "int4.h"
#include "simd.h"

namespace {

// Activations for one call in P int8 parts per element (split_ref, common.h), laid out for the weights'
// layout and the vector width in use (int4_quantize_row; interleaved rows: r8_quantize_row, natural order).
template <int P>
struct QuantizedX {
  at::Tensor q, r;   // int8 [M, K]: the parts (r: P = 2 only)
  at::Tensor scale;  // float [M, K / 32]: the step per block (part_step)
  // int32: -8 times the parts' value (256 q + r, or q) over each 4 elements, [M, K / 4] (rows in order);
  // the parts' value over each block, [M, K / 32] (interleaved: r8_quantize_row)
  at::Tensor bias;
  at::Tensor sum;    // float [M, K / 32]: x's sum per block as the parts hold it (for a minimum's term)
  const int8_t* qp;
  const int8_t* rp;
  const float* sp;
  const int32_t* bp;
  const float* sum_p;
};

// The dot of one block's 32 codes (16 bytes, element i in the low nibble of byte i and i + 16 in its
// high one), less `offset`, with 32 elements of x in P int8 parts (256 q + r, or q), in natural order.
template <int P>
inline int32_t int4_block_dot(const uint8_t* row, const int8_t* xq, const int8_t* xr, int32_t offset) {
  int32_t dot = 0;
  for (int i = 0; i < 16; ++i) {
    const int32_t lo = P == 2 ? 256 * xq[i] + xr[i] : xq[i], hi = P == 2 ? 256 * xq[i + 16] + xr[i + 16] : xq[i + 16];
    dot += (int32_t(row[i] & 15) - offset) * lo + (int32_t(row[i] >> 4) - offset) * hi;
  }
  return dot;
}

// Rows interleaved by eights, as the kernels read them: where the pieces of group g's block b are. Codes
// of 4 and 5 bits: nibbles [half][row][8] (byte i of a row: element i low, i + 16 high), and for Q5 the
// fifth bits [byte][row] (byte k of each row's 32-bit word); 8-bit codes (Q8_0's int8): elements [0, 16)
// as [half][row][8], then [16, 32) alike; the 8 rows' scales (and minimums) as float16. Int4 keeps its
// scales and minimums apart, per group of `group` elements ([N / 8][groups][8]); Q5_0, Q5_1 and Q8_0 keep
// every piece of a block of 8 rows in one run of 8 blocks of the format: codes, bits, scales, minimums
// (gguf_linear.r8_order).
struct R8Rows {
  const uint8_t* w;
  const uint16_t* scale = nullptr;  // int4's
  const uint16_t* mins = nullptr;   // int4's, with minimums
  int64_t K = 0, group = 32;        // group: int4's
  int bits = 4;                     // the codes' bits: 4, 5 or 8
  int64_t run = 0;                  // bytes of a block of 8 rows kept in one run (Q5, Q8_0); 0 for int4
  int32_t offset = 0;               // the codes' offset: 8 (Q4_0), 16 (Q5_0), 128 (Q8_0 as unsigned), 0 (minimums)

  struct Block {
    const uint8_t* codes;
    const uint8_t* fifth;   // Q5 only
    const uint16_t* scales;
    const uint16_t* mins;   // null without minimums
  };
  Block at(int64_t g, int64_t b) const {
    if (run) {
      const uint8_t* p = w + (g * (K / 32) + b) * run;
      const int64_t codes = bits == 8 ? 256 : 128, fifth = bits == 5 ? 32 : 0;
      return {p, bits == 5 ? p + 128 : nullptr, (const uint16_t*)(p + codes + fifth),
              offset ? nullptr : (const uint16_t*)(p + codes + fifth + 16)};
    }
    // group 32 (GGUF's) without a division: two idivs per block (10-18 cycles each on Zen 5) took longer
    // than the block's products
    const int64_t per_row = group == 32 ? K / 32 : K / group, s = group == 32 ? b : b * 32 / group;
    const int64_t f = (g * per_row + s) * 8;
    return {w + g * 4 * K + b * 128, nullptr, scale + f, mins ? mins + f : nullptr};
  }
  int64_t block_bytes() const { return run ? run : 128; }
};

// Row i (0..7) of a block of 8 interleaved rows: its code bytes as rows in order keep them, 8 at a time
// from the pieces R8Rows describes. 16 bytes of nibbles (byte j: element j low, j + 16 high) for codes of
// 4 and 5 bits, 32 of int8 in natural order for 8. The one place the pieces' positions are spelled out.
inline void r8_row_bytes(const R8Rows::Block& blk, int bits, int64_t i, uint8_t* out) {
  for (int64_t p = 0; p < (bits == 8 ? 4 : 2); ++p) std::memcpy(out + 8 * p, blk.codes + p / 2 * 128 + p % 2 * 64 + 8 * i, 8);
}

// Row i (0..7) of a block of 8 interleaved rows: its 32 codes in natural order, unsigned (Q8_0's int8
// plus 128).
inline void r8_codes(const R8Rows::Block& blk, int bits, int64_t i, int32_t codes[32]) {
  uint8_t bytes[32];
  r8_row_bytes(blk, bits, i, bytes);
  for (int e = 0; e < 32; ++e) {
    if (bits == 8) {
      codes[e] = int8_t(bytes[e]) + 128;
      continue;
    }
    codes[e] = e < 16 ? bytes[e] & 15 : bytes[e - 16] >> 4;
    if (blk.fifth) codes[e] |= ((blk.fifth[8 * (e / 8) + i] >> (e % 8)) & 1) << 4;
  }
}

#define TRAMONTANE_TILES "int4_tiles.h"
#include "per_isa.h"

template <int P>
QuantizedX<P> quantize_x(const float* x, int64_t M, int64_t K, bool interleaved) {
  const int64_t nb = K / 32, biases = interleaved ? nb : K / 4;
  QuantizedX<P> out;
  out.q = at::empty({M, K}, at::kChar);
  out.r = at::empty({P == 2 ? M : 0, K}, at::kChar);
  out.scale = at::empty({M, nb}, at::kFloat);
  out.bias = at::empty({M, biases}, at::kInt);
  out.sum = at::empty({M, nb}, at::kFloat);
  int8_t* q = out.q.template data_ptr<int8_t>();
  int8_t* r = P == 2 ? out.r.template data_ptr<int8_t>() : nullptr;
  float* s = out.scale.template data_ptr<float>();
  int32_t* bias = out.bias.template data_ptr<int32_t>();
  float* sums = out.sum.template data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    int8_t *qm = q + m * K, *rm = r ? r + m * K : nullptr;
    if (interleaved) {
      BY_ISA(r8_quantize_row<P>(xm, K, qm, rm, s + m * nb, bias + m * biases, sums + m * nb), continue);
    } else {
      BY_ISA(int4_quantize_row<P>(xm, K, qm, rm, s + m * nb, bias + m * biases, sums + m * nb), continue);
    }
    for (int64_t b = 0; b < nb; ++b) {  // the portable kernels: natural order, symmetric offsets per block
      int32_t totals[2];
      const float d = split_block_ref<P>(xm + 32 * b, qm + 32 * b, rm ? rm + 32 * b : nullptr, totals);
      s[m * nb + b] = part_step<P>(d);
      sums[m * nb + b] = part_step<P>(d) * float(totals[0] + totals[1]);
      if (interleaved) bias[m * biases + b] = totals[0] + totals[1];
    }
  }
  out.qp = q;
  out.rp = r;
  out.sp = s;
  out.bp = bias;
  out.sum_p = sums;
  return out;
}

inline float half_to_float(uint16_t h) { return float(c10::Half(h, c10::Half::from_bits())); }

// ---------------------------------------------------------------------------------------- portable
template <int P>
void int4_rows_ref(const QuantizedX<P>& qx, int64_t M, int64_t K, const uint8_t* w, const uint16_t* wscale,
                   const uint16_t* wmin, int64_t group, float* y, int64_t N, int64_t begin, int64_t end) {
  const int64_t nb = K / 32, groups = K / group;
  const int32_t offset = wmin ? 0 : 8;
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = w + o * (K / 2);
    for (int64_t m = 0; m < M; ++m) {
      const int8_t *xq = qx.qp + m * K, *xr = qx.rp ? qx.rp + m * K : nullptr;
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const int32_t dot = int4_block_dot<P>(row + b * 16, xq + b * 32, xr ? xr + b * 32 : nullptr, offset);
        const int64_t g = o * groups + b * 32 / group;
        acc += float(dot) * half_to_float(wscale[g]) * qx.sp[m * nb + b];
        if (wmin) acc += half_to_float(wmin[g]) * qx.sum_p[m * nb + b];
      }
      y[m * N + o] = acc;
    }
  }
}

// Interleaved rows, one at a time.
template <int P>
void r8_rows_ref(const QuantizedX<P>& qx, int64_t M, const R8Rows& rows, float* y, int64_t N, int64_t begin, int64_t end) {
  const int64_t K = rows.K, nb = K / 32;
  for (int64_t g = begin; g < end; ++g)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < 8; ++i) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t at = m * nb + b;
          const R8Rows::Block blk = rows.at(g, b);
          int32_t codes[32], dot = 0;
          r8_codes(blk, rows.bits, i, codes);
          for (int e = 0; e < 32; ++e)
            dot += (codes[e] - rows.offset) * (P == 2 ? 256 * qx.qp[at * 32 + e] + qx.rp[at * 32 + e] : qx.qp[at * 32 + e]);
          acc += float(dot) * (half_to_float(blk.scales[i]) * qx.sp[at]);
          if (blk.mins) acc += half_to_float(blk.mins[i]) * qx.sum_p[at];
        }
        y[m * N + 8 * g + i] = acc;
      }
}

// y = x @ dequant(W).T for rows interleaved by eights (N of them).
template <int P>
void r8_products(const float* x, int64_t M, const R8Rows& rows, float* y, int64_t N) {
  const QuantizedX<P> qx = quantize_x<P>(x, M, rows.K, true);
  parallel_pieces(N / 8, std::max<int64_t>(1, grain(N) / 8), [&](int64_t begin, int64_t end) {
    BY_ISA(r8_rows(qx, M, rows, y, N, begin, end), return);
    r8_rows_ref(qx, M, rows, y, N, begin, end);
  });
}

void check_int4(const at::Tensor& w, const at::Tensor& scale, const c10::optional<at::Tensor>& mins,
                int64_t group) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), "w must be contiguous uint8 [N, K/2]");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(group > 0 && group % 32 == 0 && K % group == 0, "group size must be a multiple of 32 that divides K");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.numel() == N * (K / group),
              "scale must be contiguous float16 [N, K/group]");
  if (mins)
    TORCH_CHECK(mins->scalar_type() == at::kHalf && mins->is_contiguous() && mins->numel() == N * (K / group),
                "mins must be contiguous float16 [N, K/group]");
}

const uint16_t* half_bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); }

}  // namespace

at::Tensor int4_linear(at::Tensor x, at::Tensor w, at::Tensor scale, c10::optional<at::Tensor> mins,
                          int64_t group, bool interleaved) {
  check_int4(w, scale, mins, group);
  const int64_t N = w.size(0), K = w.size(1) * 2, M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(!interleaved || N % 8 == 0, "interleaved int4 rows come in eights, got ", N, " rows");
  auto y = at::empty({M, N}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* sp = half_bits(scale);
  const uint16_t* mp = mins ? half_bits(*mins) : nullptr;
  float* yp = y.data_ptr<float>();
  if (M >= kAmxMinRowsInt4 && amx_in_use() && !interleaved) {  // (the policy interleaves none with AMX)
    int4_linear_amx(x.data_ptr<float>(), M, K, wp, sp, mp, group, yp, N);
    return y;
  }
  with_parts([&](auto parts) {
    constexpr int P = decltype(parts)::value;
    if (interleaved) {  // groups of 8 rows
      const R8Rows rows{wp, sp, mp, K, group, 4, 0, mp ? 0 : 8};
      r8_products<P>(x.data_ptr<float>(), M, rows, yp, N);
      return;
    }
    const QuantizedX<P> qx = quantize_x<P>(x.data_ptr<float>(), M, K, false);
    parallel_pieces(N, grain(N), [&](int64_t begin, int64_t end) {
      BY_ISA(int4_rows(qx, M, K, wp, sp, mp, group, yp, N, begin, end), return);
      int4_rows_ref(qx, M, K, wp, sp, mp, group, yp, N, begin, end);
    });
  });
  return y;
}

// GGUF rows of K elements interleaved by eights: Q5_0 (bits 5), Q5_1 (5, with_mins) or Q8_0 (8).
static R8Rows gguf_r8_rows(const uint8_t* w, int64_t K, int bits, bool with_mins) {
  // a block of 32 per row: codes (16 or 32 bytes), Q5's fifth bits (4), a float16 scale (and minimum)
  const int64_t run = 8 * ((bits == 8 ? 32 : 16) + (bits == 5 ? 4 : 0) + (with_mins ? 4 : 2));
  const int32_t offset = with_mins ? 0 : bits == 8 ? 128 : 1 << (bits - 1);
  return R8Rows{w, nullptr, nullptr, K, 32, bits, run, offset};
}

void r8_row_in_order(const uint8_t* w, int64_t K, int bits, bool with_mins, int64_t o, uint8_t* out) {
  const R8Rows rows = gguf_r8_rows(w, K, bits, with_mins);
  const int64_t i = o % 8, head = with_mins ? 4 : 2;
  for (int64_t b = 0; b < K / 32; ++b) {
    const R8Rows::Block blk = rows.at(o / 8, b);
    std::memcpy(out, blk.scales + i, 2);
    if (with_mins) std::memcpy(out + 2, blk.mins + i, 2);
    out += head;
    if (bits == 5)
      for (int k = 0; k < 4; ++k) *out++ = blk.fifth[8 * k + i];
    r8_row_bytes(blk, bits, i, out);
    out += bits == 8 ? 32 : 16;
  }
}

at::Tensor r8_block_linear(at::Tensor x, at::Tensor w, int64_t K, int bits, bool with_mins) {
  const int64_t N = w.size(0), M = x.size(0);  // whole groups of 8 (blocks.cpp checks)
  auto y = at::empty({M, N}, x.options());
  const R8Rows rows = gguf_r8_rows(w.data_ptr<uint8_t>(), K, bits, with_mins);
  with_parts([&](auto parts) { r8_products<decltype(parts)::value>(x.data_ptr<float>(), M, rows, y.data_ptr<float>(), N); });
  return y;
}

// Row o of int4 weights as fp32 into dst (its own function, every argument a value: nothing the stores
// could alias, so the loop stays vectorised).
static void int4_row(const uint8_t* wp, const uint16_t* sp, const uint16_t* mp, int64_t K, int64_t group,
                     bool interleaved, int64_t o, float* __restrict dst) {
  const int64_t groups = K / group;
  const R8Rows rows{wp, sp, mp, K, group};
  for (int64_t b = 0; b < K / 32; ++b) {
    uint8_t joined[16];  // an interleaved row's block as rows in order keep it
    const uint8_t* bytes = joined;
    uint16_t s16, m16 = 0;
    if (interleaved) {
      const R8Rows::Block blk = rows.at(o / 8, b);
      r8_row_bytes(blk, 4, o % 8, joined);
      s16 = blk.scales[o % 8];
      if (mp) m16 = blk.mins[o % 8];
    } else {
      bytes = wp + o * (K / 2) + b * 16;
      s16 = sp[o * groups + b * 32 / group];
      if (mp) m16 = mp[o * groups + b * 32 / group];
    }
    int32_t codes[32];
    for (int64_t i = 0; i < 16; ++i) codes[i] = bytes[i] & 15, codes[i + 16] = bytes[i] >> 4;
    const float s = half_to_float(s16);
    const float base = mp ? half_to_float(m16) : -8.f * s;  // (q - 8) * s = q * s - 8 s
#pragma omp simd
    for (int64_t i = 0; i < 32; ++i) dst[b * 32 + i] = float(codes[i]) * s + base;
  }
}

// Dequantize packed int4 rows (interleaved by eights or not) to fp32 or bf16 [N, K]: the tiles of a prefill
// product, multiplied in the policy's GEMM dtype.
at::Tensor int4_dequantize(at::Tensor w, at::Tensor scale, c10::optional<at::Tensor> mins, int64_t group,
                           bool interleaved, bool bf16) {
  check_int4(w, scale, mins, group);
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(!interleaved || N % 8 == 0, "interleaved int4 rows come in eights, got ", N, " rows");
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* sp = half_bits(scale);
  const uint16_t* mp = mins ? half_bits(*mins) : nullptr;
  return dequantized_rows(N, K, bf16, [=](int64_t o, float* dst) { int4_row(wp, sp, mp, K, group, interleaved, o, dst); });
}
