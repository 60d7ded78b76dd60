// CPU entry points shared between the linear (ops_cpu.cpp) and conv (conv_cpu.cpp) paths.
// Arguments are checked by the callers (checks.h).
#pragma once
#include <ATen/ATen.h>

#include "../checks.h"
#include "kernels.h"

namespace sparsekern {

// The micro-kernels of the widest ISA this CPU supports (SPARSEKERN_ISA may cap it).
template <typename T> KernelTable<T> select_kernels();

at::Tensor dds_linear_cpu(const at::Tensor& a, const at::Tensor& values,
                          const at::Tensor& row_offsets, const at::Tensor& col_idx,
                          const at::Tensor& t_offsets, const at::Tensor& t_rows,
                          const at::Tensor& t_perm, int64_t n_rows, int64_t n_cols, bool trans_w);
at::Tensor sdd_linear_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_idx,
                          const at::Tensor& col_idx, int64_t bm, int64_t bk);

at::Tensor dds_conv_cpu(const at::Tensor& a, const at::Tensor& values,
                        const at::Tensor& row_offsets, const at::Tensor& col_idx,
                        const at::Tensor& t_offsets, const at::Tensor& t_rows,
                        const at::Tensor& t_perm, int64_t n_rows, int64_t n_cols, bool trans_w,
                        const ConvGeometry& g);
at::Tensor sdd_conv_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_idx,
                        const at::Tensor& col_idx, int64_t bm, int64_t bk, const ConvGeometry& g);

}  // namespace sparsekern
