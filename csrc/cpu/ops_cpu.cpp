// CPU implementations of sparsekern::_dds_native and sparsekern::_sdd_native (schemas live in
// sparsekern/ops.py). Checks every argument the kernels index with, transposes activations to the
// feature-major layout the micro-kernels want (kernels.h), picks the widest ISA the CPU supports
// and runs the work items dynamically over torch's intra-op thread pool (OpenMP).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>

#include "../checks.h"
#include "kernels.h"
#include "ops_cpu.h"

namespace sparsekern {
namespace {

bool cpu_has(const char* feature) {
  __builtin_cpu_init();
  if (std::strcmp(feature, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  if (std::strcmp(feature, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return false;
}

// SPARSEKERN_ISA=avx2|base caps the ISA (for testing every path on one machine).
int isa_level() {
  static const int level = [] {
    int best = cpu_has("avx512") ? 2 : (cpu_has("avx2") ? 1 : 0);
    const char* cap = std::getenv("SPARSEKERN_ISA");
    if (cap && std::strcmp(cap, "avx2") == 0) best = std::min(best, 1);
    if (cap && std::strcmp(cap, "base") == 0) best = 0;
    return best;
  }();
  return level;
}

}  // namespace

template <> KernelTable<float> select_kernels<float>() {
  static const KernelTable<float> t = isa_level() == 2 ? kernels_f32_avx512()
                                      : isa_level() == 1 ? kernels_f32_avx2()
                                                         : kernels_f32_base();
  return t;
}
template <> KernelTable<double> select_kernels<double>() {
  static const KernelTable<double> t = isa_level() == 2 ? kernels_f64_avx512()
                                       : isa_level() == 1 ? kernels_f64_avx2()
                                                          : kernels_f64_base();
  return t;
}

namespace {

// x [B, F] (any strides) -> [F, Bp] with columns B..Bp zero.
template <typename T>
at::Tensor to_feature_major(const at::Tensor& x, int64_t Bp) {
  const int64_t B = x.size(0), F = x.size(1);
  const int64_t sb = x.stride(0), sf = x.stride(1);
  at::Tensor out = at::empty({F, Bp}, x.options());
  const T* src = x.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  constexpr int64_t TILE = 32;
  const int64_t f_tiles = (F + TILE - 1) / TILE;
  at::parallel_for(0, f_tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t ft = t0; ft < t1; ++ft) {
      const int64_t f0 = ft * TILE, f1 = std::min(F, f0 + TILE);
      for (int64_t b0 = 0; b0 < B; b0 += TILE) {
        const int64_t b1 = std::min(B, b0 + TILE);
        for (int64_t f = f0; f < f1; ++f)
          for (int64_t b = b0; b < b1; ++b) dst[f * Bp + b] = src[b * sb + f * sf];
      }
      for (int64_t f = f0; f < f1; ++f)
        for (int64_t b = B; b < Bp; ++b) dst[f * Bp + b] = T(0);
    }
  });
  return out;
}

// [F, Bp] -> [B, F] contiguous.
template <typename T>
at::Tensor from_feature_major(const at::Tensor& xt, int64_t B) {
  const int64_t F = xt.size(0), Bp = xt.size(1);
  at::Tensor out = at::empty({B, F}, xt.options());
  const T* src = xt.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  constexpr int64_t TILE = 32;
  const int64_t b_tiles = (B + TILE - 1) / TILE;
  at::parallel_for(0, b_tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t bt = t0; bt < t1; ++bt) {
      const int64_t b0 = bt * TILE, b1 = std::min(B, b0 + TILE);
      for (int64_t f0 = 0; f0 < F; f0 += TILE) {
        const int64_t f1 = std::min(F, f0 + TILE);
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t f = f0; f < f1; ++f) dst[b * F + f] = src[f * Bp + b];
      }
    }
  });
  return out;
}

template <typename T>
at::Tensor dds_typed(const at::Tensor& a, const at::Tensor& values, const at::Tensor& offsets,
                     const at::Tensor& others, const at::Tensor* perm, int64_t n_seg,
                     int64_t out_rows, int64_t t_len, int64_t sr, int64_t st) {
  const KernelTable<T> kt = select_kernels<T>();
  const int64_t B = a.size(0);
  const int64_t Bp = round_up(std::max<int64_t>(B, 1), kt.vec_len);
  at::Tensor at_ = to_feature_major<T>(a, Bp);
  at::Tensor ot = at::empty({n_seg * out_rows, Bp}, a.options());
  SpmmArgs<T> args{values.data_ptr<T>(), offsets.data_ptr<int32_t>(), others.data_ptr<int32_t>(),
                   perm ? perm->data_ptr<int32_t>() : nullptr, out_rows, t_len, sr, st,
                   values.size(1) * values.size(2), at_.data_ptr<T>(), ot.data_ptr<T>(), Bp};
  const int64_t n_bt = (Bp + kt.tile_b - 1) / kt.tile_b;
  parallel_dynamic(n_seg * n_bt, [&](int64_t i) {
    const int64_t seg = i / n_bt, b0 = (i % n_bt) * kt.tile_b;
    kt.spmm(args, seg, b0, std::min(kt.tile_b, Bp - b0));
  });
  return from_feature_major<T>(ot, B);
}

// a @ S over block columns of S, batch-major in and out, parallel over (batch tile, block
// column), batch tiles outermost: the threads share one batch tile of activations (in L2/L3)
// while the blocks stream, instead of streaming all activations once per block column (1.5x
// faster for 4096x4096 at 90%, batch 4096, on the Intel host); needs bk % vec_len == 0.
// x @ W passes W's blocks with the transpose metadata; x @ W^T passes W's blocks transposed
// with the row CSR (a value copy far smaller than the activations at the sparsities that
// matter).
template <typename T>
at::Tensor dds_columns_typed(const at::Tensor& a, const at::Tensor& values,
                             const at::Tensor& offsets, const at::Tensor& rows,
                             const at::Tensor* perm, int64_t n_cols) {
  const KernelTable<T> kt = select_kernels<T>();
  const at::Tensor ac = a.stride(1) == 1 ? a : a.contiguous();
  const int64_t B = a.size(0), bm = values.size(1), bk = values.size(2);
  at::Tensor out = at::empty({B, n_cols}, a.options());
  ColumnArgs<T> args{values.data_ptr<T>(), offsets.data_ptr<int32_t>(), rows.data_ptr<int32_t>(),
                     perm ? perm->data_ptr<int32_t>() : nullptr, bm, bk,
                     ac.data_ptr<T>(), ac.stride(0), out.data_ptr<T>(), n_cols};
  constexpr int64_t kBatchTile = 64;
  const int64_t n_bt = (B + kBatchTile - 1) / kBatchTile, n_bcols = n_cols / bk;
  parallel_dynamic(n_bcols * n_bt, [&](int64_t i) {
    const int64_t j = i % n_bcols, b0 = (i / n_bcols) * kBatchTile;
    kt.dds_columns(args, j, b0, std::min(kBatchTile, B - b0));
  });
  return out;
}

}  // namespace

at::Tensor dds_linear_cpu(const at::Tensor& a, const at::Tensor& values,
                          const at::Tensor& row_offsets, const at::Tensor& col_idx,
                          const at::Tensor& t_offsets, const at::Tensor& t_rows,
                          const at::Tensor& t_perm, int64_t n_rows, int64_t n_cols,
                          bool trans_w) {
  const int64_t bm = values.size(1), bk = values.size(2);
  const at::Tensor v = values.contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparsekern_dds_cpu", [&] {
    const int64_t vec_len = select_kernels<scalar_t>().vec_len;
    if (trans_w && bm % vec_len == 0)  // y[B, M] = a[B, K] W^T
      out = dds_columns_typed<scalar_t>(a, v.transpose(1, 2).contiguous(), row_offsets, col_idx,
                                        nullptr, n_rows);
    else if (trans_w)  // same, feature-major: segments are block rows.
      out = dds_typed<scalar_t>(a, v, row_offsets, col_idx, nullptr, n_rows / bm, bm, bk, bk, 1);
    else if (bk % vec_len == 0)  // y[B, K] = a[B, M] W
      out = dds_columns_typed<scalar_t>(a, v, t_offsets, t_rows, &t_perm, n_cols);
    else          // same, feature-major: segments are block columns, via transpose metadata.
      out = dds_typed<scalar_t>(a, v, t_offsets, t_rows, &t_perm, n_cols / bk, bk, bm, 1, bk);
  });
  return out;
}

at::Tensor sdd_linear_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_idx,
                          const at::Tensor& col_idx, int64_t bm, int64_t bk) {
  const int64_t nnz = row_idx.numel();
  at::Tensor out = at::empty({nnz, bm, bk}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparsekern_sdd_cpu", [&] {
    const KernelTable<scalar_t> kt = select_kernels<scalar_t>();
    const int64_t B = a.size(0);
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const int32_t *rows = row_idx.data_ptr<int32_t>(), *cols = col_idx.data_ptr<int32_t>();
    if (bk % kt.vec_len == 0) {  // vectors along the block's columns: no transposes needed
      const at::Tensor ac = a.stride(1) == 1 ? a : a.contiguous();
      const at::Tensor bc = b.stride(1) == 1 ? b : b.contiguous();
      SddArgs<scalar_t> args{ac.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(), rows, cols, bm, bk,
                             out_ptr, bc.stride(0), ac.stride(0), B};
      parallel_dynamic(nnz, [&](int64_t p) { kt.sdd_batch_major(args, p); });
      return;
    }
    const int64_t Bp = round_up(std::max<int64_t>(B, 1), kt.vec_len);
    at::Tensor at_ = to_feature_major<scalar_t>(a, Bp);
    at::Tensor bt = to_feature_major<scalar_t>(b, Bp);
    SddArgs<scalar_t> args{at_.data_ptr<scalar_t>(), bt.data_ptr<scalar_t>(), rows, cols, bm, bk,
                           out_ptr, Bp};
    parallel_dynamic(nnz, [&](int64_t p) { kt.sdd(args, p); });
  });
  return out;
}


std::string cpu_isa() {
  return isa_level() == 2 ? "avx512" : (isa_level() == 1 ? "avx2" : "base");
}

namespace {

at::Tensor dds_cpu(const at::Tensor& a, const at::Tensor& values, const at::Tensor& row_offsets,
                   const at::Tensor& col_idx, const at::Tensor& t_offsets,
                   const at::Tensor& t_rows, const at::Tensor& t_perm, int64_t n_rows,
                   int64_t n_cols, bool trans_w, at::OptionalIntArrayRef conv,
                   const c10::optional<at::Tensor>& bias, bool relu,
                   const c10::optional<at::Tensor>& relu_mask) {
  check_bias(bias, values, n_rows, trans_w);
  check_relu(a, trans_w, relu, relu_mask);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor mask = relu_mask.has_value() ? *relu_mask : at::Tensor();
  if (conv.has_value() && !conv->empty()) {
    const ConvGeometry g = check_dds_conv_args(a, values, row_offsets, col_idx, t_offsets, t_rows,
                                               t_perm, n_rows, n_cols, trans_w, *conv, at::kCPU);
    return dds_conv_cpu(a, values, row_offsets, col_idx, t_offsets, t_rows, t_perm, n_rows,
                        n_cols, trans_w, g, b, relu, mask);
  }
  check_dds_args(a, values, row_offsets, col_idx, t_offsets, t_rows, t_perm, n_rows, n_cols,
                 trans_w, at::kCPU);
  const at::Tensor a_in = mask.defined() ? at::threshold_backward(a, mask, 0) : a;
  at::Tensor out = dds_linear_cpu(a_in, values, row_offsets, col_idx, t_offsets, t_rows, t_perm,
                                  n_rows, n_cols, trans_w);
  if (b.defined()) out.add_(b);  // in place: no second output tensor
  return relu ? out.relu_() : out;
}

at::Tensor sdd_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_idx,
                   const at::Tensor& col_idx, int64_t bm, int64_t bk, at::OptionalIntArrayRef conv) {
  if (conv.has_value() && !conv->empty()) {
    const ConvGeometry g = check_sdd_conv_args(a, b, row_idx, col_idx, bm, bk, *conv, at::kCPU);
    return sdd_conv_cpu(a, b, row_idx, col_idx, bm, bk, g);
  }
  check_sdd_args(a, b, row_idx, col_idx, bm, bk, at::kCPU);
  return sdd_linear_cpu(a, b, row_idx, col_idx, bm, bk);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("_dds_native", &dds_cpu);
  m.impl("_sdd_native", &sdd_cpu);
}

}  // namespace sparsekern
