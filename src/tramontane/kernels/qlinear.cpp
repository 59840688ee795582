// Weight-only quantized matrix multiplication for CPU decode: y[M, N] = x[M, K] @ dequant(W)[N, K]^T,
// for fp32 and int8 (one scale per output channel) weights; int4 lives in int4.cpp. Plus the fused
// decode attention and the Python bindings of every kernel.
//
// A decode step reads every weight once, so speed is memory bandwidth over weight bytes. These
// kernels convert int8 weights to fp32 in registers and multiply-accumulate with fp32 activations.
// Each weight row is converted once and used for every row of x (batched decode), while it sits in L1.
//
// Paths: AVX-512 and AVX2 (chosen at run time; dense_tiles.h, written once over the vector width), and
// portable C++ elsewhere. Threads split the output
// rows through ATen's parallel_for, so the kernels share PyTorch's thread pool.

#include "simd.h"

#include <pybind11/stl.h>

#include <vector>

#ifdef __linux__
#include <malloc.h>
#include <omp.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace {

// ---------------------------------------------------------------------------------------- portable
void int8_rows_ref(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, float* y,
                   int64_t N, int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    const int8_t* row = w + o * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += float(row[k]) * xm[k];
      y[m * N + o] = acc * scale[o];
    }
  }
}

#define TRAMONTANE_TILES "dense_tiles.h"
#include "per_isa.h"

}  // namespace

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kInt8 && w.is_contiguous(), "w must be contiguous int8 [N, K]");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(scale.numel() == N && scale.scalar_type() == torch::kFloat32 && scale.is_contiguous(), "scale must be float32 [N]");
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M >= kAmxMinRowsInt8 && K % 32 == 0 && amx_in_use()) {
    int8_linear_amx(xp, M, K, wp, sp, yp, N);
    return y;
  }
  at::parallel_for(0, N, grain(N), [&](int64_t begin, int64_t end) {
    BY_ISA(dense_rows(xp, M, K, wp, sp, yp, N, begin, end), return);
    int8_rows_ref(xp, M, K, wp, sp, yp, N, begin, end);
  });
  return y;
}

torch::Tensor f32_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.is_contiguous(), "w must be contiguous float32 [N, K]");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check_x(x, K);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (current_isa() == Isa::kRef) return torch::matmul(x, w.t());
  at::parallel_for(0, N, grain(N), [&](int64_t begin, int64_t end) {
    BY_ISA(dense_rows(xp, M, K, wp, static_cast<const float*>(nullptr), yp, N, begin, end), return);
  });
  return y;
}

// ---------------------------------------------------------------------------------------- decode attention
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
namespace {

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
  torch::ScalarType type = torch::kFloat32;  // float32, bfloat16, float16, or int8 with
  float* scale = nullptr;                     // one scale per vector
  int64_t D = 0;

  template <typename T>
  T* at_(int64_t at) const { return static_cast<T*>(data) + at * D; }

  // store x (D values) at vector index `at`
  void put(int64_t at, const float* x) const {
    switch (type) {
      case torch::kFloat32: std::memcpy(at_<float>(at), x, D * sizeof(float)); return;
      case torch::kBFloat16: put_as(at_<c10::BFloat16>(at), x, D); return;
      case torch::kHalf: put_as(at_<c10::Half>(at), x, D); return;
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
      case torch::kFloat32: return dot_as(at_<float>(at), x, D);
      case torch::kBFloat16: return dot_as(at_<c10::BFloat16>(at), x, D);
      case torch::kHalf: return dot_as(at_<c10::Half>(at), x, D);
      default: return dot_as(at_<int8_t>(at), x, D) * scale[at];
    }
  }

  // o += w * vector
  void axpy(int64_t at, float w, float* o) const {
    switch (type) {
      case torch::kFloat32: axpy_as(at_<float>(at), w, o, D); return;
      case torch::kBFloat16: axpy_as(at_<c10::BFloat16>(at), w, o, D); return;
      case torch::kHalf: axpy_as(at_<c10::Half>(at), w, o, D); return;
      default: axpy_as(at_<int8_t>(at), w * scale[at], o, D); return;
    }
  }
};

KvStore kv_store(const torch::Tensor& cache, const c10::optional<torch::Tensor>& scale, const char* name) {
  TORCH_CHECK(cache.is_contiguous() && cache.dim() == 4, name, " cache must be contiguous [blocks, KV, S, D]");
  KvStore st;
  st.D = cache.size(3);
  st.type = cache.scalar_type();
  st.data = cache.data_ptr();
  if (st.type == torch::kFloat32 || st.type == torch::kBFloat16 || st.type == torch::kHalf) {
    TORCH_CHECK(!scale.has_value(), name, " scales are only for an int8 cache");
    return st;
  }
  TORCH_CHECK(st.type == torch::kInt8 && scale.has_value(), name,
              " cache must be float32, bfloat16, float16, or int8 with scales");
  TORCH_CHECK(scale->scalar_type() == torch::kFloat32 && scale->is_contiguous() &&
                  scale->numel() == cache.numel() / st.D, name, " scales must be contiguous float32 [blocks, KV, S]");
  st.scale = scale->data_ptr<float>();
  return st;
}

}  // namespace

torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor rot, torch::Tensor kcache, torch::Tensor vcache,
                               c10::optional<torch::Tensor> kscale, c10::optional<torch::Tensor> vscale,
                               torch::Tensor tables, torch::Tensor key_pos, torch::Tensor write, torch::Tensor q_pos,
                               int64_t window, int64_t scan, int64_t n_heads, int64_t n_kv_heads) {
  const int64_t B = qkv.size(0), KV = n_kv_heads, H = n_heads, rep = H / KV;
  const int64_t NB = kcache.size(0), S = kcache.size(2), D = kcache.size(3);
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 && qkv.is_contiguous() && qkv.size(1) == (H + 2 * KV) * D,
              "qkv must be contiguous float32 [B, (H + 2 KV) D]");
  TORCH_CHECK(kcache.size(1) == KV && vcache.sizes() == kcache.sizes(), "caches must be [blocks, KV, S, D] alike");
  const KvStore ks = kv_store(kcache, kscale, "key"), vs = kv_store(vcache, vscale, "value");
  TORCH_CHECK(rot.scalar_type() == torch::kFloat32 && rot.is_contiguous() && rot.numel() == B * D,
              "rot must be contiguous float32 [B, D/2, 2] (cos, sin)");
  TORCH_CHECK(tables.scalar_type() == torch::kInt64 && tables.dim() == 2 && tables.size(0) == B,
              "tables must be int64 [B, W]");
  TORCH_CHECK(key_pos.scalar_type() == torch::kInt64 && key_pos.is_contiguous() && key_pos.numel() == NB * S,
              "key_pos must be contiguous int64 [blocks, S]");
  TORCH_CHECK(write.numel() == B && q_pos.numel() == B, "write and q_pos must hold one entry per row");
  TORCH_CHECK(scan >= 1 && scan <= S, "scan out of range");
  tables = tables.contiguous();
  write = write.contiguous();
  q_pos = q_pos.contiguous();
  const int64_t W = tables.size(1);
  auto out = torch::empty({B, H * D}, qkv.options());
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
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(W * scan), q(D);
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / KV, g = bk % KV;
      const float* row = qp + b * (H + 2 * KV) * D;
      const float* r = rp + b * D;  // (cos, sin) pairs
      const int64_t qn = qpos[b];
      const int64_t* table = tp + b * W;
      for (int64_t h = g * rep; h < (g + 1) * rep; ++h) {
        const float* qsrc = row + h * D;
        for (int64_t i = 0; i < D / 2; ++i) {
          const float c = r[2 * i], s = r[2 * i + 1], x0 = qsrc[2 * i], x1 = qsrc[2 * i + 1];
          q[2 * i] = (x0 * c - x1 * s) * scale;
          q[2 * i + 1] = (x0 * s + x1 * c) * scale;
        }
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

std::string isa() {
  const Isa i = current_isa();
  if (amx_in_use()) return "amx";
  return i == Isa::kAvx512 ? "avx512" : i == Isa::kAvxVnni ? "avx_vnni" : i == Isa::kAvx2 ? "avx2" : "portable";
}

// bf16 products in hardware: AMX-BF16 tiles (where the system grants them) or AVX512-BF16 dot products.
bool has_bf16() {
#ifdef TRAMONTANE_X86
  __builtin_cpu_init();
  return amx_available() || __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// The instruction sets this CPU can run the kernels with, best last.
std::vector<std::string> isas() {
  const Isa best = detect_isa();
  std::vector<std::string> out = {"portable"};
  if (best >= Isa::kAvx2) out.push_back("avx2");
  if (best >= Isa::kAvxVnni && avx_vnni_available()) out.push_back("avx_vnni");
  if (best == Isa::kAvx512) out.push_back("avx512");
  if (amx_available()) out.push_back("amx");
  return out;
}

void set_isa(const std::string& name) {
  const auto have = isas();
  TORCH_CHECK(std::find(have.begin(), have.end(), name) != have.end(), "instruction set ", name,
              " is not available on this CPU");
  current_isa() = name == "portable" ? Isa::kRef
                  : name == "avx2"   ? Isa::kAvx2
                  : name == "avx_vnni" ? Isa::kAvxVnni
                                       : Isa::kAvx512;  // avx512, amx
  amx_in_use() = name == "amx";
}

// An uninitialised uint8 tensor of `nbytes` whose memory Linux backs with 2 MiB pages where it can
// (transparent huge pages, asked for with madvise): a decode step reads every weight once, and with
// 4 KiB pages the walks for its TLB misses cost batch-1 int4 about 15% of its bandwidth. The memory is
// mapped directly, 2 MiB-aligned, rather than taken from malloc, whose heap would keep the pages of the
// tensors it replaces. Elsewhere, or if mapping fails, an ordinary tensor.
torch::Tensor huge_page_empty(int64_t nbytes) {
  TORCH_CHECK(nbytes >= 0, "nbytes must be >= 0");
#ifdef __linux__
  constexpr size_t kHuge = size_t(2) << 20;
  if (nbytes >= int64_t(kHuge)) {
    const size_t size = (size_t(nbytes) + kHuge - 1) / kHuge * kHuge;
    void* raw = mmap(nullptr, size + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw != MAP_FAILED) {
      // keep the 2 MiB-aligned `size` bytes inside the mapping, unmap the rest
      const uintptr_t start = uintptr_t(raw), aligned = (start + kHuge - 1) / kHuge * kHuge;
      if (aligned > start) munmap(raw, aligned - start);
      if (start + kHuge > aligned) munmap(reinterpret_cast<void*>(aligned + size), start + kHuge - aligned);
      void* p = reinterpret_cast<void*>(aligned);
      // whole huge pages only: the tail stays in 4 KiB pages, so no memory past nbytes becomes resident
      madvise(p, size_t(nbytes) / kHuge * kHuge, MADV_HUGEPAGE);  // a hint: failure leaves ordinary pages
      return torch::from_blob(p, {nbytes}, [size](void* q) { munmap(q, size); }, torch::dtype(torch::kUInt8));
    }
  }
#endif
  return torch::empty({nbytes}, torch::kUInt8);
}

// Give the C heap's free memory back to the system (glibc's malloc_trim): the weights that loading
// replaced were freed into it, where their pages stay resident.
void trim_heap() {
#if defined(__linux__) && defined(__GLIBC__)
  malloc_trim(0);
#endif
}

// End the OpenMP worker threads of the calling thread's team (libgomp frees its pool; a later parallel
// region on this thread makes a new one). Once a second thread computes, two teams exist, and with more
// OpenMP threads than cores libgomp stops spinning between parallel regions: on 2 cores a decode step
// on the server's engine thread took 19 ms instead of 10 while the loading thread's idle team lived.
void release_threads() { omp_pause_resource_all(omp_pause_soft); }

// Ask Linux to reclaim the whole pages in [address, address + nbytes) (MADV_PAGEOUT): for the mapped
// pages of a checkpoint file, whose tensors have been copied out (quantized, fused or moved into huge
// pages), which would otherwise stay in the process's resident set as long as the file stays mapped.
// Reclaiming never loses data (file pages are read again if touched); it is only a hint.
void release_pages(int64_t address, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_PAGEOUT)
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (uintptr_t(address) + page - 1) / page * page;
  const uintptr_t end = (uintptr_t(address) + uintptr_t(nbytes)) / page * page;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_PAGEOUT);
#endif
}

void bind_decode_stack(pybind11::module_& m);  // decode.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the compute runs without the interpreter lock: the server's event loop answers meanwhile
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("f32_linear", &f32_linear, nogil, "y = x @ w.T for fp32 w [N, K], tuned for few rows of x");
  m.def("int8_linear", &int8_linear, nogil, "y = x @ (w * scale[:, None]).T for int8 w [N, K]");
  m.def("int4_linear", &int4_linear, nogil, "y = x @ dequant(w).T for packed int4 w [N, K/2] with float16 scales [N, K/group]");
  m.def("decode_attention", &decode_attention, nogil, "rotary + cache write + masked attention for one decode step",
        py::arg("qkv"), py::arg("rot"), py::arg("kcache"), py::arg("vcache"), py::arg("kscale"), py::arg("vscale"),
        py::arg("tables"), py::arg("key_pos"), py::arg("write"), py::arg("q_pos"), py::arg("window"), py::arg("scan"),
        py::arg("n_heads"), py::arg("n_kv_heads"));
  m.def("int4_dequantize", &int4_dequantize, nogil, "packed int4 rows to fp32 [N, K]");
  m.def("block_unit", &block_unit, "(elements, bytes) of one unit of a GGUF block format, by ggml type number");
  m.def("block_amx_min_rows", &block_amx_min_rows, "rows of x from which a GGUF block format's products run on AMX tiles");
  m.def("block_linear", &block_linear, nogil, "y = x @ dequant(w).T for w in a GGUF block format, its rows as the file has them");
  m.def("block_dequantize", &block_dequantize, nogil, "rows of a GGUF block format to fp32 [N, K]");
  m.def("huge_page_empty", &huge_page_empty, "uninitialised uint8 [nbytes], in 2 MiB pages where Linux allows");
  m.def("trim_heap", &trim_heap, "return the C heap's free memory to the system (glibc)");
  m.def("release_pages", &release_pages, nogil, "hint Linux to reclaim the whole pages of a range of file-mapped memory");
  m.def("release_threads", &release_threads, "end the calling thread's OpenMP workers (before another thread computes)");
  m.def("isa", &isa, "the instruction set in use");
  m.def("has_bf16", &has_bf16, "whether the CPU multiplies bf16 in hardware (AMX-BF16 or AVX512-BF16)");
  m.def("isas", &isas, "the instruction sets this CPU can run the kernels with, best last");
  m.def("set_isa", &set_isa, "force an instruction set (for tests): portable, avx2, avx_vnni, avx512, amx");
  m.attr("AMX_MIN_ROWS_INT4") = kAmxMinRowsInt4;
  m.attr("AMX_MIN_ROWS_INT8") = kAmxMinRowsInt8;
  // the digest of the sources this build was made from (kernels/sources.py), to tell a stale build
#define TRAMONTANE_STR2(x) #x
#define TRAMONTANE_STR(x) TRAMONTANE_STR2(x)
#ifdef TRAMONTANE_DIGEST
  m.attr("DIGEST") = TRAMONTANE_STR(TRAMONTANE_DIGEST);
#else
  m.attr("DIGEST") = "";
#endif
  bind_decode_stack(m);
}
