// Memory the kernels hand to Python: weights in mappings of their own (2 MiB pages where those pay), the C
// heap and file pages given back, and the OpenMP workers of a thread ended before another computes.

#include "common.h"

#ifdef __linux__
#include <malloc.h>
#include <omp.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

// An uninitialised uint8 tensor of `nbytes`, mapped directly (2 MiB-aligned) rather than taken from
// malloc, whose heap would keep the pages of the tensors it replaces; with `huge_pages`, backed by 2 MiB
// pages where Linux allows (transparent huge pages, asked for with madvise). A decode step reads every
// weight once, and 4 KiB pages cost it TLB misses (benchmarks/load_memory.py and run.py measure both). A
// fresh huge page costs its first write far more, though, on a virtual machine whose host takes back
// free 2 MiB blocks, so the caller weighs the two.
// Elsewhere, or if mapping fails, an ordinary tensor.
at::Tensor mapped_empty(int64_t nbytes, bool huge_pages) {
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
      if (huge_pages) madvise(p, size_t(nbytes) / kHuge * kHuge, MADV_HUGEPAGE);  // a hint: failure leaves 4 KiB pages
      // Touch every page now, on every thread: a fresh page costs its first write (the kernel zeroes it,
      // and a virtual machine's host backs it first), so that the loader's single-threaded reads that
      // follow only copy.
      volatile char* bytes = static_cast<char*>(p);
      at::parallel_for(0, (nbytes + 4095) / 4096, 512, [&](int64_t begin, int64_t end) {
        for (int64_t page = begin; page < end; ++page) bytes[page * 4096] = 0;
      });
      return at::from_blob(p, {nbytes}, [size](void* q) { munmap(q, size); }, at::kByte);
    }
  }
#endif
  return at::empty({nbytes}, at::kByte);
}

// Give the C heap's free memory back to the system (glibc's malloc_trim): the weights that loading
// replaced were freed into it, where their pages stay resident.
void trim_heap() {
#if defined(__linux__) && defined(__GLIBC__)
  malloc_trim(0);
#endif
}

// Keep the C heap's freed memory for the next allocation (up to `trim_above` bytes free at its top) and serve
// allocations below `mmap_below` bytes from it: a prefill step allocates and frees megabytes of activations,
// products and weight tiles, and memory fresh from the system costs a page fault per 4 KiB page on first
// touch. glibc's own thresholds (adaptive, from 128 KiB) gave most of those back after every step.
void keep_heap(int64_t mmap_below, int64_t trim_above) {
#if defined(__linux__) && defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, int(std::min<int64_t>(mmap_below, INT32_MAX)));
  mallopt(M_TRIM_THRESHOLD, int(std::min<int64_t>(trim_above, INT32_MAX)));
#endif
}

// End the OpenMP worker threads of the calling thread's team (libgomp frees its pool; a later parallel
// region on this thread makes a new one). Once a second thread computes, two teams exist, and with more
// OpenMP threads than cores libgomp stops spinning between parallel regions, and a decode step on the
// server's engine thread waits for its workers to wake (benchmarks/serve.py would show it).
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
