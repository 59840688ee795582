// Compiles the tile header named by TRAMONTANE_TILES once per instruction set, each copy in its own
// namespace (isa_avx512, isa_avx_vnni, isa_avx2) under its own target, with `V` its vector width. A source
// defines TRAMONTANE_TILES, includes this file, then calls the copy the CPU can run through BY_ISA.
// Every copy also gets split_tiles.h, the activations' split that the integer tiles share. Included more
// than once on purpose (no include guard); the tile headers include nothing themselves.
#ifdef TRAMONTANE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")
namespace isa_avx512 {
using V = V512;
#include "split_tiles.h"
#include TRAMONTANE_TILES
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
namespace isa_avx_vnni {
using V = V256Vnni;
#include "split_tiles.h"
#include TRAMONTANE_TILES
}  // namespace isa_avx_vnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
using V = V256Madd;
#include "split_tiles.h"
#include TRAMONTANE_TILES
}  // namespace isa_avx2
#pragma GCC pop_options
#endif
#undef TRAMONTANE_TILES
