// Argument checks shared by every native backend. The Python layer checks the same things with
// friendlier messages; these make a direct call into a kernel just as safe (no out-of-range
// index ever reaches a kernel).
#pragma once
#include <ATen/ATen.h>

namespace sparsekern {

inline void check_index_tensor(const at::Tensor& t, const char* name, int64_t numel,
                               c10::DeviceType device) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "sparsekern: ", name, " must be int32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == numel, "sparsekern: ", name,
                    " must be 1-D with ", numel, " elements, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device().type() == device, "sparsekern: ", name, " is on ", t.device(),
                    " but the kernel runs on ", device);
  TORCH_CHECK_VALUE(t.is_contiguous(), "sparsekern: ", name, " must be contiguous");
}

// offsets: CSR offsets over n_seg segments into nnz entries; others: index per entry < n_other;
// perm: optional permutation of [0, nnz).
inline void check_csr(const at::Tensor& offsets, const at::Tensor& others, const at::Tensor* perm,
                      int64_t n_seg, int64_t n_other, int64_t nnz, const char* what) {
  const at::Tensor off = offsets.cpu(), oth = others.cpu();
  const int32_t* o = off.data_ptr<int32_t>();
  TORCH_CHECK_INDEX(o[0] == 0 && o[n_seg] == nnz, "sparsekern: ", what,
                    " offsets must start at 0 and end at nnz=", nnz, ", got ", o[0], " and ",
                    o[n_seg]);
  for (int64_t s = 0; s < n_seg; ++s)
    TORCH_CHECK_INDEX(o[s] <= o[s + 1], "sparsekern: ", what, " offsets must be non-decreasing (at ",
                      s, ")");
  const int32_t* x = oth.data_ptr<int32_t>();
  for (int64_t e = 0; e < nnz; ++e)
    TORCH_CHECK_INDEX(x[e] >= 0 && x[e] < n_other, "sparsekern: ", what, " index ", x[e],
                      " at position ", e, " is out of range [0, ", n_other, ")");
  if (perm) {
    const at::Tensor pc = perm->cpu();
    const int32_t* p = pc.data_ptr<int32_t>();
    for (int64_t e = 0; e < nnz; ++e)
      TORCH_CHECK_INDEX(p[e] >= 0 && p[e] < nnz, "sparsekern: ", what, " permutation entry ",
                        p[e], " is out of range [0, ", nnz, ")");
  }
}

inline void check_dense(const at::Tensor& a, const char* name, at::ScalarType dtype,
                        c10::DeviceType device) {
  TORCH_CHECK_VALUE(a.dim() == 2, "sparsekern: ", name, " must be 2-D, got shape ", a.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == dtype, "sparsekern: ", name, " has dtype ", a.scalar_type(),
                   " but the block values have ", dtype);
  TORCH_CHECK_VALUE(a.device().type() == device, "sparsekern: ", name, " is on ", a.device(),
                    " but the kernel runs on ", device);
}

inline void check_dds_args(const at::Tensor& a, const at::Tensor& values,
                           const at::Tensor& row_offsets, const at::Tensor& col_idx,
                           const at::Tensor& t_offsets, const at::Tensor& t_rows,
                           const at::Tensor& t_perm, int64_t n_rows, int64_t n_cols, bool trans_w,
                           c10::DeviceType device) {
  TORCH_CHECK_VALUE(values.dim() == 3, "sparsekern: values must be [nnz, bm, bk], got shape ",
                    values.sizes());
  TORCH_CHECK_VALUE(values.device().type() == device, "sparsekern: values are on ",
                    values.device(), " but the kernel runs on ", device);
  const int64_t nnz = values.size(0), bm = values.size(1), bk = values.size(2);
  TORCH_CHECK_VALUE(bm > 0 && bk > 0 && n_rows % bm == 0 && n_cols % bk == 0,
                    "sparsekern: matrix shape [", n_rows, ", ", n_cols,
                    "] is not a multiple of the block shape (", bm, ", ", bk, ")");
  check_dense(a, "input", values.scalar_type(), device);
  TORCH_CHECK_VALUE(a.size(1) == (trans_w ? n_cols : n_rows), "sparsekern: input has ",
                    a.size(1), " features but the sparse matrix [", n_rows, ", ", n_cols,
                    "] needs ", (trans_w ? n_cols : n_rows), (trans_w ? " (x @ W^T)" : " (x @ W)"));
  const int64_t n_brows = n_rows / bm, n_bcols = n_cols / bk;
  check_index_tensor(row_offsets, "row_offsets", n_brows + 1, device);
  check_index_tensor(col_idx, "col_idx", nnz, device);
  check_index_tensor(t_offsets, "t_offsets", n_bcols + 1, device);
  check_index_tensor(t_rows, "t_rows", nnz, device);
  check_index_tensor(t_perm, "t_perm", nnz, device);
  if (trans_w)
    check_csr(row_offsets, col_idx, nullptr, n_brows, n_bcols, nnz, "row_offsets/col_idx");
  else
    check_csr(t_offsets, t_rows, &t_perm, n_bcols, n_brows, nnz, "t_offsets/t_rows/t_perm");
}

inline void check_sdd_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_idx,
                           const at::Tensor& col_idx, int64_t bm, int64_t bk,
                           c10::DeviceType device) {
  TORCH_CHECK_VALUE(bm > 0 && bk > 0, "sparsekern: block shape must be positive, got (", bm, ", ",
                    bk, ")");
  TORCH_CHECK_TYPE(a.is_floating_point(), "sparsekern: sdd operands must be floating point");
  check_dense(a, "sdd left operand", a.scalar_type(), device);
  check_dense(b, "sdd right operand", a.scalar_type(), device);
  TORCH_CHECK_VALUE(a.size(0) == b.size(0), "sparsekern: sdd operands have batch ", a.size(0),
                    " and ", b.size(0));
  TORCH_CHECK_VALUE(a.size(1) % bm == 0 && b.size(1) % bk == 0, "sparsekern: sdd operand widths ",
                    a.size(1), " and ", b.size(1), " are not multiples of the block shape (", bm,
                    ", ", bk, ")");
  const int64_t nnz = row_idx.numel();
  check_index_tensor(row_idx, "row_idx", nnz, device);
  check_index_tensor(col_idx, "col_idx", nnz, device);
  const at::Tensor r = row_idx.cpu(), c = col_idx.cpu();
  const int32_t *rp = r.data_ptr<int32_t>(), *cp = c.data_ptr<int32_t>();
  const int64_t n_brows = a.size(1) / bm, n_bcols = b.size(1) / bk;
  for (int64_t p = 0; p < nnz; ++p) {
    TORCH_CHECK_INDEX(rp[p] >= 0 && rp[p] < n_brows, "sparsekern: row_idx ", rp[p],
                      " at position ", p, " is out of range [0, ", n_brows, ")");
    TORCH_CHECK_INDEX(cp[p] >= 0 && cp[p] < n_bcols, "sparsekern: col_idx ", cp[p],
                      " at position ", p, " is out of range [0, ", n_bcols, ")");
  }
}

}  // namespace sparsekern
