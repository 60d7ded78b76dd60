// CPU entry points shared between the linear (ops_cpu.cpp) and conv (conv_cpu.cpp) paths.
// Arguments are checked by the callers (checks.h).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>

#include "../checks.h"
#include "kernels.h"

namespace sparsekern {

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Dynamic scheduling with per-thread state: worker(claim) runs once on each thread and calls
// claim(i0, i1) for the next chunk [i0, i1) of [0, n) until it returns false. On a host whose
// cores run at uneven speeds (a shared VM, a noisy neighbour) a static split makes every call
// wait for the slowest core; claiming chunks lets the faster core take more of them.
template <typename W>
void parallel_chunks(int64_t n, int64_t chunk, const W& worker) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t n_threads = std::min<int64_t>(at::get_num_threads(), (n + chunk - 1) / chunk);
  at::parallel_for(0, n_threads, 1, [&](int64_t, int64_t) {
    worker([&](int64_t& i0, int64_t& i1) {
      i0 = next.fetch_add(chunk);
      i1 = std::min(n, i0 + chunk);
      return i0 < n;
    });
  });
}

// Runs fn(i) for i in [0, n) with dynamic scheduling (rows of a pruned matrix are uneven).
// Items are claimed in chunks (about 64 per thread in all) so that a million tiny items, e.g.
// the blocks of a (1,1) topology, do not fight over one atomic counter.
template <typename F>
void parallel_dynamic(int64_t n, const F& fn) {
  const int64_t chunk = std::max<int64_t>(1, n / (64 * std::max(1, at::get_num_threads())));
  parallel_chunks(n, chunk, [&](const auto& claim) {
    for (int64_t i0, i1; claim(i0, i1);)
      for (int64_t i = i0; i < i1; ++i) fn(i);
  });
}

// The micro-kernels of the widest ISA this CPU supports (SPARSEKERN_ISA may cap it).
template <typename T> KernelTable<T> select_kernels();

at::Tensor dds_linear_cpu(const at::Tensor& a, const at::Tensor& values,
                          const at::Tensor& row_offsets, const at::Tensor& col_idx,
                          const at::Tensor& t_offsets, const at::Tensor& t_rows,
                          const at::Tensor& t_perm, int64_t n_rows, int64_t n_cols, bool trans_w);
at::Tensor sdd_linear_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_idx,
                          const at::Tensor& col_idx, int64_t bm, int64_t bk);

// relu (trans_w only): y = max(y, 0) after the bias. relu_mask (not trans_w; a's shape and
// layout): a is zeroed where relu_mask is not > 0 first (the backward of a fused ReLU whose
// output is relu_mask).
at::Tensor dds_conv_cpu(const at::Tensor& a, const at::Tensor& values,
                        const at::Tensor& row_offsets, const at::Tensor& col_idx,
                        const at::Tensor& t_offsets, const at::Tensor& t_rows,
                        const at::Tensor& t_perm, int64_t n_rows, int64_t n_cols, bool trans_w,
                        const ConvGeometry& g, const at::Tensor& bias = at::Tensor(),
                        bool relu = false, const at::Tensor& relu_mask = at::Tensor());
at::Tensor sdd_conv_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_idx,
                        const at::Tensor& col_idx, int64_t bm, int64_t bk, const ConvGeometry& g);

}  // namespace sparsekern
