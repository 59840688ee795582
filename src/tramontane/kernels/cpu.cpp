// Which instruction sets the CPU has, which one the kernels use, and the switch tests use to force one.

#include "amx.h"

#include <algorithm>
#include <string>
#include <vector>

std::string isa() {
  const Isa i = current_isa();
  if (amx_in_use()) return "amx";
  return i == Isa::kAvx512 ? "avx512" : i == Isa::kAvxVnni ? "avx_vnni" : i == Isa::kAvx2 ? "avx2" : "portable";
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
