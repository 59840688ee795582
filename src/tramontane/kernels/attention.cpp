// One decode step of attention for B sequences, one new token each, in a single call: rotary embedding
// of q and k (Mistral's interleaved pairs), the write of k and v into the cache, and attention with the
// position mask (0 <= p <= q_pos, p > q_pos - window). Replaces a dozen small tensor operations per
// layer, whose dispatch cost dominates decoding a small model.
//
// The cache is a pool of blocks [n_blocks, KV, S, D] with the position of every slot [n_blocks, S]
// (-1: empty). Row b reads the blocks of its table tables[b] ([B, W]), the first `scan` slots of each,
// and writes its new key and value at flat slot write[b] (block * S + offset). A contiguous cache is
// the case of one block per row (S = capacity, tables[b] = {row}), a paged pool the general one.
// Keys and values are float32, bfloat16, float16, or int8 with one float32 scale per stored vector
// ([n_blocks, KV, S]).

#include "attention.h"
#include "simd.h"

#include <vector>

namespace {

constexpr int64_t kMaxRep = 8;  // query heads per kv head that the vector path takes (attention_tiles.h)
// Slots per part of a row's attention. Fixed, never chosen from the step's size: a row's result must be the
// same bits alone or beside other rows (speculative decoding's greedy tokens equal plain decoding's only
// so), and 128 slots give a one-sequence step of 3 kv heads enough parts for two cores from 256 positions.
constexpr int64_t kPartSlots = 128;

#define TRAMONTANE_TILES "attention_tiles.h"
#include "per_isa.h"

// One stored vector of D values in a storage type T (float, bf16, fp16): converted on the fly, rounded to
// nearest even when stored, as PyTorch's `.to(dtype)` rounds.
template <typename T>
void put_as(T* dst, const float* x, int64_t D) {
  for (int64_t i = 0; i < D; ++i) dst[i] = T(x[i]);
}

template <typename T>
float dot_as(const T* k, const float* x, int64_t D) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < D; ++i) acc += x[i] * float(k[i]);
  return acc;
}

template <typename T>
void axpy_as(const T* v, float w, float* o, int64_t D) {
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) o[i] += w * float(v[i]);
}

struct KvStore {
  void* data = nullptr;
  at::ScalarType type = at::kFloat;  // float32, bfloat16, float16, or int8 with
  float* scale = nullptr;                     // one scale per vector
  int64_t D = 0;

  template <typename T>
  T* at_(int64_t at) const { return static_cast<T*>(data) + at * D; }

  // store x (D values) at vector index `at`
  void put(int64_t at, const float* x) const {
    switch (type) {
      case at::kFloat: std::memcpy(at_<float>(at), x, D * sizeof(float)); return;
      case at::kBFloat16: put_as(at_<c10::BFloat16>(at), x, D); return;
      case at::kHalf: put_as(at_<c10::Half>(at), x, D); return;
      default: break;
    }
    float amax = 0.f;
    for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int8_t* dst = at_<int8_t>(at);
    for (int64_t i = 0; i < D; ++i) dst[i] = int8_t(std::nearbyint(x[i] * inv));
    scale[at] = s;
  }

  float dot(int64_t at, const float* x) const {
    switch (type) {
      case at::kFloat: return dot_as(at_<float>(at), x, D);
      case at::kBFloat16: return dot_as(at_<c10::BFloat16>(at), x, D);
      case at::kHalf: return dot_as(at_<c10::Half>(at), x, D);
      default: return dot_as(at_<int8_t>(at), x, D) * scale[at];
    }
  }

  // o += w * vector
  void axpy(int64_t at, float w, float* o) const {
    switch (type) {
      case at::kFloat: axpy_as(at_<float>(at), w, o, D); return;
      case at::kBFloat16: axpy_as(at_<c10::BFloat16>(at), w, o, D); return;
      case at::kHalf: axpy_as(at_<c10::Half>(at), w, o, D); return;
      default: axpy_as(at_<int8_t>(at), w * scale[at], o, D); return;
    }
  }
};

// Rotary embedding (interleaved pairs r = (cos, sin)) of one D-wide vector, times `scale`.
void rotate(const float* x, const float* r, int64_t D, float scale, float* out) {
  for (int64_t i = 0; i < D / 2; ++i) {
    const float c = r[2 * i], s = r[2 * i + 1], x0 = x[2 * i], x1 = x[2 * i + 1];
    out[2 * i] = (x0 * c - x1 * s) * scale;
    out[2 * i + 1] = (x0 * s + x1 * c) * scale;
  }
}

// Keys and values stored as T (float, bf16, fp16) on a vector ISA: each (row, kv head) in parts of
// kPartSlots of its W * scan slots (a decode step of one sequence has as few tasks as kv heads, 3 on
// SmolLM2, which left one of two cores idle a third of the time; a contiguous cache is one block per row,
// so the parts split slots, not blocks), each part through attend_part, then the parts of a row combined
// by their largest scores, in order.
template <typename T>
void attend_split(const float* qp, const float* rp, const T* kc, const T* vc, const int64_t* kp,
                  const int64_t* tp, const int64_t* qpos, int64_t B, int64_t H, int64_t KV, int64_t D, int64_t S,
                  int64_t W, int64_t scan, int64_t window, float scale, float* op) {
  const int64_t rep = H / KV, tasks = B * KV;
  const int64_t slots = W * scan;
  const int64_t parts = (slots + kPartSlots - 1) / kPartSlots;
  std::vector<float> ms(tasks * parts * rep), ls(tasks * parts * rep), os(tasks * parts * rep * D);
  parallel_pieces(tasks * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(rep * D), scores(rep * kPartSlots);  // (a multiple of attend_part's score_stride)
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bk = i / parts, c = i % parts, b = bk / KV, g = bk % KV;
      const float* row = qp + b * (H + 2 * KV) * D;
      for (int64_t h = 0; h < rep; ++h) rotate(row + (g * rep + h) * D, rp + b * D, D, scale, q.data() + h * D);
      BY_ISA(attend_part(q.data(), rep, D, kc, vc, kp, tp + b * W, c * kPartSlots, std::min(slots, (c + 1) * kPartSlots), S, scan, KV,
                         g, qpos[b], window, scores.data(), ms.data() + i * rep, ls.data() + i * rep,
                         os.data() + i * rep * D),
             continue);
    }
  });
  for (int64_t bk = 0; bk < tasks; ++bk) {
    const int64_t b = bk / KV, g = bk % KV;
    for (int64_t h = 0; h < rep; ++h) {
      float top = -INFINITY, total = 0.f;
      for (int64_t c = 0; c < parts; ++c) top = std::max(top, ms[(bk * parts + c) * rep + h]);
      float* o = op + b * H * D + (g * rep + h) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      for (int64_t c = 0; c < parts; ++c) {
        const int64_t at = (bk * parts + c) * rep + h;
        if (ms[at] == -INFINITY) continue;  // a part whose keys were all masked
        const float w = std::exp(ms[at] - top);
        total += w * ls[at];
        for (int64_t d = 0; d < D; ++d) o[d] += w * os[at * D + d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= total;
    }
  }
}

KvStore kv_store(const at::Tensor& cache, const c10::optional<at::Tensor>& scale, const char* name) {
  TORCH_CHECK(cache.is_contiguous() && cache.dim() == 4, name, " cache must be contiguous [blocks, KV, S, D]");
  KvStore st;
  st.D = cache.size(3);
  st.type = cache.scalar_type();
  st.data = cache.data_ptr();
  if (st.type == at::kFloat || st.type == at::kBFloat16 || st.type == at::kHalf) {
    TORCH_CHECK(!scale.has_value(), name, " scales are only for an int8 cache");
    return st;
  }
  TORCH_CHECK(st.type == at::kChar && scale.has_value(), name,
              " cache must be float32, bfloat16, float16, or int8 with scales");
  TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() &&
                  scale->numel() == cache.numel() / st.D, name, " scales must be contiguous float32 [blocks, KV, S]");
  st.scale = scale->data_ptr<float>();
  return st;
}

}  // namespace

at::Tensor decode_attention(at::Tensor qkv, at::Tensor rot, at::Tensor kcache, at::Tensor vcache,
                               c10::optional<at::Tensor> kscale, c10::optional<at::Tensor> vscale,
                               at::Tensor tables, at::Tensor key_pos, at::Tensor write, at::Tensor q_pos,
                               int64_t window, int64_t scan, int64_t n_heads, int64_t n_kv_heads) {
  const int64_t B = qkv.size(0), KV = n_kv_heads, H = n_heads, rep = H / KV;
  const int64_t NB = kcache.size(0), S = kcache.size(2), D = kcache.size(3);
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.is_contiguous() && qkv.size(1) == (H + 2 * KV) * D,
              "qkv must be contiguous float32 [B, (H + 2 KV) D]");
  TORCH_CHECK(kcache.size(1) == KV && vcache.sizes() == kcache.sizes(), "caches must be [blocks, KV, S, D] alike");
  const KvStore ks = kv_store(kcache, kscale, "key"), vs = kv_store(vcache, vscale, "value");
  TORCH_CHECK(rot.scalar_type() == at::kFloat && rot.is_contiguous() && rot.numel() == B * D,
              "rot must be contiguous float32 [B, D/2, 2] (cos, sin)");
  TORCH_CHECK(tables.scalar_type() == at::kLong && tables.dim() == 2 && tables.size(0) == B,
              "tables must be int64 [B, W]");
  TORCH_CHECK(key_pos.scalar_type() == at::kLong && key_pos.is_contiguous() && key_pos.numel() == NB * S,
              "key_pos must be contiguous int64 [blocks, S]");
  TORCH_CHECK(write.numel() == B && q_pos.numel() == B, "write and q_pos must hold one entry per row");
  TORCH_CHECK(scan >= 1 && scan <= S, "scan out of range");
  tables = tables.contiguous();
  write = write.contiguous();
  q_pos = q_pos.contiguous();
  const int64_t W = tables.size(1);
  auto out = at::empty({B, H * D}, qkv.options());
  const float* qp = qkv.data_ptr<float>();
  const float* rp = rot.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* wp = write.data_ptr<int64_t>();
  const int64_t* kp = key_pos.data_ptr<int64_t>();
  const int64_t* qpos = q_pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(wp[b] >= 0 && wp[b] < NB * S, "write slot out of range");
    for (int64_t j = 0; j < W; ++j) TORCH_CHECK(tp[b * W + j] >= 0 && tp[b * W + j] < NB, "block out of range");
  }
  float* op = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(float(D));
  // Every row's key and value are written before any row attends: rows may be tokens of one prompt
  // chunk, each seeing the keys of the rows before it (the positions mask the ones after). Writing is a
  // rotation per kv head, little next to attention, so it runs on this thread.
  {
    std::vector<float> k(D);
    for (int64_t b = 0; b < B; ++b) {
      const float* row = qp + b * (H + 2 * KV) * D;
      const float* r = rp + b * D;  // (cos, sin) pairs
      const int64_t blk = wp[b] / S, off = wp[b] % S;
      for (int64_t g = 0; g < KV; ++g) {
        const float* ksrc = row + (H + g) * D;
        for (int64_t i = 0; i < D / 2; ++i) {
          const float c = r[2 * i], s = r[2 * i + 1], x0 = ksrc[2 * i], x1 = ksrc[2 * i + 1];
          k[2 * i] = x0 * c - x1 * s;
          k[2 * i + 1] = x0 * s + x1 * c;
        }
        const int64_t at = (blk * KV + g) * S + off;  // vector (block, g, offset)
        ks.put(at, k.data());
        vs.put(at, row + (H + KV + g) * D);
      }
    }
  }
  if (ks.type == vs.type && ks.type != at::kChar && D % 16 == 0 && rep <= kMaxRep && current_isa() != Isa::kRef) {
    const auto attend = [&](auto* typed) {  // typed: a null pointer of the stored type
      using T = std::remove_pointer_t<decltype(typed)>;
      attend_split(qp, rp, static_cast<const T*>(ks.data), static_cast<const T*>(vs.data), kp, tp, qpos, B, H, KV, D,
                   S, W, scan, window, scale, op);
    };
    if (ks.type == at::kFloat) attend(static_cast<float*>(nullptr));
    else if (ks.type == at::kBFloat16) attend(static_cast<c10::BFloat16*>(nullptr));
    else attend(static_cast<c10::Half*>(nullptr));
    return out;
  }
  parallel_pieces(B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(W * scan), q(D);
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / KV, g = bk % KV;
      const float* row = qp + b * (H + 2 * KV) * D;
      const float* r = rp + b * D;  // (cos, sin) pairs
      const int64_t qn = qpos[b];
      const int64_t* table = tp + b * W;
      for (int64_t h = g * rep; h < (g + 1) * rep; ++h) {
        rotate(row + h * D, r, D, scale, q.data());
        float mx = -INFINITY;
        for (int64_t j = 0; j < W; ++j) {
          const int64_t* pos = kp + table[j] * S;
          const int64_t base = (table[j] * KV + g) * S;
          for (int64_t t = 0; t < scan; ++t) {
            const int64_t p = pos[t];
            float& sc = scores[j * scan + t];
            if (p < 0 || p > qn || (window > 0 && p <= qn - window)) {
              sc = -INFINITY;
              continue;
            }
            sc = ks.dot(base + t, q.data());
            mx = std::max(mx, sc);
          }
        }
        float denom = 0.f;
        for (float& sc : scores) {
          sc = sc == -INFINITY ? 0.f : std::exp(sc - mx);
          denom += sc;
        }
        float* o = op + b * H * D + h * D;
        for (int64_t i = 0; i < D; ++i) o[i] = 0.f;
        for (int64_t j = 0; j < W; ++j) {
          const int64_t base = (table[j] * KV + g) * S;
          for (int64_t t = 0; t < scan; ++t) {
            const float sc = scores[j * scan + t];
            if (sc != 0.f) vs.axpy(base + t, sc / denom, o);
          }
        }
      }
    }
  });
  return out;
}
