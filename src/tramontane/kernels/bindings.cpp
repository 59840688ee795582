// The Python bindings of every kernel (the module `tramontane.kernels._native`); kernels/__init__.py
// types them (`Kernels`).

#include "amx.h"
#include "attention.h"
#include "blocks.h"
#include "dense.h"
#include "int4.h"

#include <torch/csrc/utils/pybind.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

std::string isa();
std::vector<std::string> isas();
void set_isa(const std::string& name);
at::Tensor mapped_empty(int64_t nbytes, bool huge_pages);
void trim_heap();
void keep_heap(int64_t mmap_below, int64_t trim_above);
void release_threads();
void release_pages(int64_t address, int64_t nbytes);
void bind_decode_stack(pybind11::module_& m);  // decode.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the compute runs without the interpreter lock: the server's event loop answers meanwhile
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("f32_linear", &f32_linear, nogil, "y = x @ w.T for fp32 w [N, K], tuned for few rows of x");
  m.def("int8_linear", &int8_linear, nogil, "y = x @ (w * scale[:, None]).T for int8 w [N, K]");
  m.def("int4_linear", &int4_linear, nogil, "y = x @ dequant(w).T for packed int4 w [N, K/2] with float16 scales [N, K/group]",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("mins"), py::arg("group"), py::arg("interleaved") = false);
  m.def("decode_attention", &decode_attention, nogil, "rotary + cache write + masked attention for one decode step",
        py::arg("qkv"), py::arg("rot"), py::arg("kcache"), py::arg("vcache"), py::arg("kscale"), py::arg("vscale"),
        py::arg("tables"), py::arg("key_pos"), py::arg("write"), py::arg("q_pos"), py::arg("window"), py::arg("scan"),
        py::arg("n_heads"), py::arg("n_kv_heads"));
  m.def("int4_dequantize", &int4_dequantize, nogil, "packed int4 rows to fp32 (or bf16) [N, K]", py::arg("w"),
        py::arg("scale"), py::arg("mins"), py::arg("group"), py::arg("interleaved") = false, py::arg("bf16") = false);
  m.def("block_unit", &block_unit, "(elements, bytes) of one unit of a GGUF block format, by ggml type number");
  m.def("block_amx_min_rows", &block_amx_min_rows, "rows of x from which a GGUF block format's products run on AMX tiles");
  m.def("block_linear", &block_linear, nogil,
        "y = x @ dequant(w).T for w in a GGUF block format, its rows as the file has them (or Q5 rows interleaved by eights)",
        py::arg("x"), py::arg("w"), py::arg("kind"), py::arg("interleaved") = false);
  m.def("block_dequantize", &block_dequantize, nogil, "rows of a GGUF block format to fp32 (or bf16) [N, K]",
        py::arg("w"), py::arg("kind"), py::arg("bf16") = false, py::arg("interleaved") = false);
  m.def("mapped_empty", &mapped_empty, "uninitialised uint8 [nbytes] in memory of its own, in 2 MiB pages if asked and Linux allows",
        py::arg("nbytes"), py::arg("huge_pages"));
  m.def("trim_heap", &trim_heap, "return the C heap's free memory to the system (glibc)");
  m.def("keep_heap", &keep_heap, "keep freed memory in the C heap and serve allocations below mmap_below from it (glibc)",
        py::arg("mmap_below"), py::arg("trim_above"));
  m.def("release_pages", &release_pages, nogil, "hint Linux to reclaim the whole pages of a range of file-mapped memory");
  m.def("release_threads", &release_threads, "end the calling thread's OpenMP workers (before another thread computes)");
  m.def("isa", &isa, "the instruction set in use");
  m.def("isas", &isas, "the instruction sets this CPU can run the kernels with, best last");
  m.def("set_isa", &set_isa, "force an instruction set (for tests): portable, avx2, avx_vnni, avx512, amx");
  m.def("activation_parts", [] { return activation_parts(); },
        "int8 parts per element of the integer kernels' activations: 2 (about 15 bits) or 1 (8 bits)");
  m.def("set_activation_parts", [](int64_t parts) {
    TORCH_CHECK(parts == 1 || parts == 2, "activation parts must be 1 or 2, got ", parts);
    activation_parts() = int(parts);
  }, "set the integer kernels' activation parts, 1 or 2, for the whole process (the kernel policy's choice)");
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
