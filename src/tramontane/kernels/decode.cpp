// The decode step's transformer blocks in one native call.
//
// Decoding one token of a small model is a long chain of small operations: per block two RMSNorms,
// four projections, attention, a SwiGLU and two residual adds. Through Python and PyTorch's dispatcher
// each costs microseconds of overhead, which for a 135M model is as much time as the arithmetic. A
// DecodeStack holds references to every block's weights (no copies) and runs the whole stack for
// B sequences x 1 token, calling the same kernels as the Python path (dense.cpp, int4.cpp, blocks.cpp). The
// Python side (layers.py, model.py) stays the reference and handles everything else: prefill, MoE,
// other dtypes and devices.

#include "attention.h"
#include "blocks.h"
#include "dense.h"
#include "int4.h"

#include <torch/csrc/utils/pybind.h>
#include <pybind11/stl.h>

#include <vector>

namespace {

// How a projection's weights are stored (bound as ProjectionKind; kernels/__init__.py mirrors it): fp32,
// int8 per output channel, int4 in groups (with or without minimums; rows in order, or interleaved by
// eights as int4.cpp describes), or a GGUF block format (`group` holding its ggml type number; Q5_0, Q5_1
// and Q8_0 rows may be interleaved by eights too).
enum class ProjectionKind : int64_t { kFloat = 0, kInt8 = 1, kInt4 = 2, kGguf = 3, kInt4Interleaved = 4, kGgufInterleaved = 5 };

// One projection of a kind, or the outputs of `parts` side by side (projections a checkpoint keeps in
// different formats, which cannot be stacked into one matrix).
struct Projection {
  ProjectionKind kind;
  at::Tensor w, scale;
  int64_t group;
  c10::optional<at::Tensor> mins;
  std::vector<Projection> parts;

  at::Tensor operator()(const at::Tensor& x) const {
    if (!parts.empty()) {
      std::vector<at::Tensor> outs;
      for (const Projection& p : parts) outs.push_back(p(x));
      return at::cat(outs, 1);
    }
    if (kind == ProjectionKind::kInt8) return int8_linear(x, w, scale);
    if (kind == ProjectionKind::kInt4 || kind == ProjectionKind::kInt4Interleaved)
      return int4_linear(x, w, scale, mins, group, kind == ProjectionKind::kInt4Interleaved);
    if (kind == ProjectionKind::kGguf || kind == ProjectionKind::kGgufInterleaved)
      return block_linear(x, w, group, kind == ProjectionKind::kGgufInterleaved);
    // one row: PyTorch's matrix-vector product reads fp32 weights at full speed; more: the tiled kernel
    return x.size(0) == 1 ? at::linear(x, w) : f32_linear(x, w);
  }
};

struct Block {
  at::Tensor attention_norm, ffn_norm;
  Projection wqkv, wo, w13, w2;
};

// out = x / sqrt(mean(x^2) + eps) * weight, row by row ([B, D]).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, float eps) {
  const int64_t B = x.size(0), D = x.size(1);
  auto out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* row = xp + b * D;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; ++i) ss += row[i] * row[i];
    const float inv = 1.f / std::sqrt(ss / float(D) + eps);
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) op[b * D + i] = row[i] * inv * wp[i];
  }
  return out;
}

// [B, 2F] (gate | up) -> silu(gate) * up, [B, F], with PyTorch's vectorized, threaded silu as the Python
// blocks do (a scalar loop of exp is a visible share of a batched decode step)
at::Tensor swiglu(const at::Tensor& gu) {
  const int64_t F = gu.size(1) / 2;
  return at::silu(gu.narrow(1, 0, F)).mul_(gu.narrow(1, F, F));
}

void add_into(at::Tensor& h, const at::Tensor& delta) {
  float* hp = h.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  const int64_t n = h.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) hp[i] += dp[i];
}

class DecodeStack {
 public:
  DecodeStack(double eps, int64_t n_heads, int64_t n_kv_heads) : eps_(float(eps)), heads_(n_heads), kv_heads_(n_kv_heads) {}

  void add_block(at::Tensor attention_norm, at::Tensor ffn_norm, Projection wqkv, Projection wo,
                 Projection w13, Projection w2) {
    blocks_.push_back({attention_norm.contiguous(), ffn_norm.contiguous(), wqkv, wo, w13, w2});
  }

  // h [B, dim] (one new token per sequence) through every block; the cache tensors are
  // [layers, blocks, kv_heads, S, head_dim] (scales [layers, blocks, kv_heads, S] for int8), the other
  // arguments as for decode_attention.
  at::Tensor forward(at::Tensor h, at::Tensor rot, at::Tensor kcache, at::Tensor vcache,
                        c10::optional<at::Tensor> kscale, c10::optional<at::Tensor> vscale,
                        at::Tensor tables, at::Tensor key_pos, at::Tensor write, at::Tensor q_pos,
                        int64_t window, int64_t scan) const {
    TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.device().is_cpu(), "h must be float32 [B, dim]");
    TORCH_CHECK(kcache.size(0) == int64_t(blocks_.size()), "cache has ", kcache.size(0), " layers, the stack ",
                blocks_.size());
    TORCH_CHECK(kscale.has_value() == vscale.has_value(), "give both scales or neither");
    h = h.contiguous().clone();
    const int64_t B = h.size(0);
    for (size_t l = 0; l < blocks_.size(); ++l) {
      const Block& blk = blocks_[l];
      auto qkv = blk.wqkv(rms_norm(h, blk.attention_norm, eps_));
      c10::optional<at::Tensor> ksl, vsl;
      if (kscale.has_value()) {
        ksl = (*kscale)[l];
        vsl = (*vscale)[l];
      }
      auto attn = decode_attention(qkv, rot, kcache[l], vcache[l], ksl, vsl, tables, key_pos, write, q_pos, window,
                                   scan, heads_, kv_heads_);
      add_into(h, blk.wo(attn.view({B, -1})));
      add_into(h, blk.w2(swiglu(blk.w13(rms_norm(h, blk.ffn_norm, eps_)))));
    }
    return h;
  }

  int64_t size() const { return int64_t(blocks_.size()); }

 private:
  float eps_;
  int64_t heads_, kv_heads_;
  std::vector<Block> blocks_;
};

}  // namespace

void bind_decode_stack(pybind11::module_& m) {
  namespace py = pybind11;
  py::enum_<ProjectionKind>(m, "ProjectionKind")
      .value("FLOAT", ProjectionKind::kFloat)
      .value("INT8", ProjectionKind::kInt8)
      .value("INT4", ProjectionKind::kInt4)
      .value("INT4_INTERLEAVED", ProjectionKind::kInt4Interleaved)
      .value("GGUF_INTERLEAVED", ProjectionKind::kGgufInterleaved)
      .value("GGUF", ProjectionKind::kGguf);
  py::class_<Projection>(m, "Projection")
      .def(py::init([](ProjectionKind kind, at::Tensor w, at::Tensor scale, int64_t group,
                       c10::optional<at::Tensor> mins) { return Projection{kind, w, scale, group, mins, {}}; }),
           py::arg("kind"), py::arg("weight"), py::arg("scale"), py::arg("group"), py::arg("mins") = py::none())
      .def_static("side_by_side", [](std::vector<Projection> parts) {
        TORCH_CHECK(!parts.empty(), "side_by_side needs at least one projection");
        return Projection{ProjectionKind::kFloat, at::Tensor(), at::Tensor(), 0, c10::nullopt, std::move(parts)};
      });
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<double, int64_t, int64_t>(), py::arg("eps"), py::arg("n_heads"), py::arg("n_kv_heads"))
      .def("add_block", &DecodeStack::add_block)
      .def("forward", &DecodeStack::forward, py::call_guard<py::gil_scoped_release>())
      .def("__len__", &DecodeStack::size);
}
