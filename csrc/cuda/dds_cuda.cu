// CUDA implementation of sparsekern::_dds_native for y = x W^T (trans_w=True): one thread per
// output element, walking the stored blocks of its block row. Simple and correct; tensor-core
// speed is a later issue. x @ W (trans_w=False) and sdd are refused here, so backend "auto"
// sends them to another backend (sparsekern/backends.py states the same).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../checks.h"

namespace sparsekern {
namespace {

template <typename T>
__global__ void dds_rows_kernel(const T* __restrict__ x, int64_t ldx, int64_t sxf,
                                const T* __restrict__ values, const int32_t* __restrict__ offsets,
                                const int32_t* __restrict__ cols, int64_t B, int64_t M, int64_t bm,
                                int64_t bk, T* __restrict__ y) {
  const int64_t m = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (m >= M) return;
  const int64_t brow = m / bm, r = m % bm;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {  // grid.y is capped at 65535
    T acc = 0;
    for (int32_t p = offsets[brow]; p < offsets[brow + 1]; ++p) {
      const T* v = values + ((int64_t)p * bm + r) * bk;
      const T* xs = x + b * ldx + (int64_t)cols[p] * bk * sxf;
      for (int64_t k = 0; k < bk; ++k) acc += v[k] * xs[k * sxf];
    }
    y[b * M + m] = acc;
  }
}

at::Tensor dds_cuda(const at::Tensor& a, const at::Tensor& values, const at::Tensor& row_offsets,
                    const at::Tensor& col_idx, const at::Tensor& t_offsets,
                    const at::Tensor& t_rows, const at::Tensor& t_perm, int64_t n_rows,
                    int64_t n_cols, bool trans_w, at::OptionalIntArrayRef conv,
                    const c10::optional<at::Tensor>& bias, bool relu,
                    const c10::optional<at::Tensor>& relu_mask) {
  TORCH_CHECK_NOT_IMPLEMENTED(!bias.has_value() && !relu && !relu_mask.has_value(),
                              "sparsekern: the CUDA C++ backend does not fuse a bias or a ReLU "
                              "(ops.py applies them around it)");
  TORCH_CHECK_NOT_IMPLEMENTED(!conv.has_value() || conv->empty(),
                              "sparsekern: the CUDA C++ backend does not implement conv yet");
  TORCH_CHECK_NOT_IMPLEMENTED(trans_w, "sparsekern: the CUDA C++ backend implements only "
                              "x @ W^T (trans_w=True) so far");
  check_dds_args(a, values, row_offsets, col_idx, t_offsets, t_rows, t_perm, n_rows, n_cols,
                 trans_w, at::kCUDA);
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor v = values.contiguous();
  const int64_t B = a.size(0);
  at::Tensor y = at::empty({B, n_rows}, a.options());
  if (B == 0 || n_rows == 0) return y;
  const int threads = 128;
  const dim3 grid((unsigned)((n_rows + threads - 1) / threads), (unsigned)std::min<int64_t>(B, 65535));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparsekern_dds_cuda", [&] {
    dds_rows_kernel<scalar_t><<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        a.data_ptr<scalar_t>(), a.stride(0), a.stride(1), v.data_ptr<scalar_t>(),
        row_offsets.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(), B, n_rows, v.size(1),
        v.size(2), y.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("_dds_native", &dds_cuda); }

}  // namespace sparsekern
