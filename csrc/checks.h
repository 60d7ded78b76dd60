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

// dims: 2 for the linear ops; a conv activation is 2-D (NHWC rows) or 4-D (NCHW), dims = 0.
inline void check_dense(const at::Tensor& a, const char* name, at::ScalarType dtype,
                        c10::DeviceType device, int64_t dims = 2) {
  if (dims)
    TORCH_CHECK_VALUE(a.dim() == dims, "sparsekern: ", name, " must be ", dims, "-D, got shape ",
                      a.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == dtype, "sparsekern: ", name, " has dtype ", a.scalar_type(),
                   " but the block values have ", dtype);
  TORCH_CHECK_VALUE(a.device().type() == device, "sparsekern: ", name, " is on ", a.device(),
                    " but the kernel runs on ", device);
}

// Everything about W and its topology; the dense operand only for dtype and device.
inline void check_dds_topology(const at::Tensor& a, const at::Tensor& values,
                               const at::Tensor& row_offsets, const at::Tensor& col_idx,
                               const at::Tensor& t_offsets, const at::Tensor& t_rows,
                               const at::Tensor& t_perm, int64_t n_rows, int64_t n_cols,
                               bool trans_w, c10::DeviceType device, int64_t dims = 2) {
  TORCH_CHECK_VALUE(values.dim() == 3, "sparsekern: values must be [nnz, bm, bk], got shape ",
                    values.sizes());
  TORCH_CHECK_VALUE(values.device().type() == device, "sparsekern: values are on ",
                    values.device(), " but the kernel runs on ", device);
  const int64_t nnz = values.size(0), bm = values.size(1), bk = values.size(2);
  TORCH_CHECK_VALUE(bm > 0 && bk > 0 && n_rows % bm == 0 && n_cols % bk == 0,
                    "sparsekern: matrix shape [", n_rows, ", ", n_cols,
                    "] is not a multiple of the block shape (", bm, ", ", bk, ")");
  check_dense(a, "input", values.scalar_type(), device, dims);
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

inline void check_dds_args(const at::Tensor& a, const at::Tensor& values,
                           const at::Tensor& row_offsets, const at::Tensor& col_idx,
                           const at::Tensor& t_offsets, const at::Tensor& t_rows,
                           const at::Tensor& t_perm, int64_t n_rows, int64_t n_cols, bool trans_w,
                           c10::DeviceType device) {
  check_dds_topology(a, values, row_offsets, col_idx, t_offsets, t_rows, t_perm, n_rows, n_cols,
                     trans_w, device);
  TORCH_CHECK_VALUE(a.size(1) == (trans_w ? n_cols : n_rows), "sparsekern: input has ",
                    a.size(1), " features but the sparse matrix [", n_rows, ", ", n_cols,
                    "] needs ", (trans_w ? n_cols : n_rows), (trans_w ? " (x @ W^T)" : " (x @ W)"));
}

// An optional bias of y = x @ W^T: [n_rows], the dtype and device of the values.
inline void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& values,
                       int64_t n_rows, bool trans_w) {
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(trans_w, "sparsekern: a bias is added to x @ W^T only (trans_w=True)");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n_rows, "sparsekern: bias must be [",
                    n_rows, "], got shape ", bias->sizes());
  TORCH_CHECK_TYPE(bias->scalar_type() == values.scalar_type(), "sparsekern: bias has dtype ",
                   bias->scalar_type(), " but the block values have ", values.scalar_type());
  TORCH_CHECK_VALUE(bias->device() == values.device(), "sparsekern: bias is on ", bias->device(),
                    " but the block values are on ", values.device());
}

// A fused ReLU: relu on x @ W^T only; relu_mask (ReLU's output, for the product that carries its
// backward) on dy @ W only, with a's shape, strides, dtype and device.
inline void check_relu(const at::Tensor& a, bool trans_w, bool relu,
                       const c10::optional<at::Tensor>& relu_mask) {
  TORCH_CHECK_VALUE(!relu || trans_w, "sparsekern: relu applies to x @ W^T only (trans_w=True)");
  if (!relu_mask.has_value()) return;
  const at::Tensor& m = *relu_mask;
  TORCH_CHECK_VALUE(!trans_w, "sparsekern: relu_mask applies to dy @ W only (trans_w=False)");
  TORCH_CHECK_VALUE(m.sizes() == a.sizes() && m.strides() == a.strides(),
                    "sparsekern: relu_mask must match the grad output's shape and strides, got ",
                    m.sizes(), " / ", m.strides(), " against ", a.sizes(), " / ", a.strides());
  TORCH_CHECK_TYPE(m.scalar_type() == a.scalar_type(), "sparsekern: relu_mask has dtype ",
                   m.scalar_type(), " but the grad output has ", a.scalar_type());
  TORCH_CHECK_VALUE(m.device() == a.device(), "sparsekern: relu_mask is on ", m.device(),
                    " but the grad output is on ", a.device());
}

// Implicit-GEMM view of a conv2d: W is [C_out (padded), R*S*C] with the reduction ordered
// (r, s, c). Activations are either NHWC rows, [N*H*W, C] (input) and [N*P*Q, *] (output), or
// NCHW tensors, [N, C, H, W] and [N, *, P, Q]; every operand of one call in the same layout.
struct ConvGeometry {
  int64_t N, H, W, C, R, S, sh, sw, ph, pw, dh, dw, P, Q;
  int64_t in_rows() const { return N * H * W; }
  int64_t out_rows() const { return N * P * Q; }
};

inline ConvGeometry check_conv_geometry(at::IntArrayRef conv, int64_t n_cols, int64_t bk) {
  TORCH_CHECK_VALUE(conv.size() == 14, "sparsekern: conv geometry must be [N, H, W, C, R, S, "
                    "stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, P, Q], got ", conv.size(),
                    " values");
  ConvGeometry g{conv[0], conv[1], conv[2], conv[3], conv[4],  conv[5],  conv[6],
                 conv[7], conv[8], conv[9], conv[10], conv[11], conv[12], conv[13]};
  TORCH_CHECK_VALUE(g.N >= 0 && g.H > 0 && g.W > 0 && g.C > 0 && g.R > 0 && g.S > 0 && g.sh > 0 &&
                        g.sw > 0 && g.ph >= 0 && g.pw >= 0 && g.dh > 0 && g.dw > 0,
                    "sparsekern: invalid conv geometry ", conv);
  const int64_t span_h = g.H + 2 * g.ph - g.dh * (g.R - 1) - 1;  // < 0: kernel exceeds input
  const int64_t span_w = g.W + 2 * g.pw - g.dw * (g.S - 1) - 1;
  TORCH_CHECK_VALUE(span_h >= 0 && span_w >= 0 && g.P == span_h / g.sh + 1 &&
                        g.Q == span_w / g.sw + 1,
                    "sparsekern: conv output size [", g.P, ", ", g.Q,
                    "] does not follow from the geometry ", conv);
  TORCH_CHECK_VALUE(n_cols == g.R * g.S * g.C, "sparsekern: conv weight has ", n_cols,
                    " columns but R*S*C = ", g.R * g.S * g.C);
  TORCH_CHECK_VALUE(g.C % bk == 0, "sparsekern: the block width ", bk,
                    " must divide the input channels ", g.C, " (a block sits at one filter tap)");
  return g;
}

// a: NHWC rows [N*h*w, C] or NCHW [N, C, h, w].
inline void check_conv_activation(const at::Tensor& a, const char* name, int64_t N, int64_t C,
                                  int64_t h, int64_t w) {
  const bool ok = a.dim() == 2 ? (a.size(0) == N * h * w && a.size(1) == C)
                               : a.dim() == 4 && a.sizes() == at::IntArrayRef({N, C, h, w});
  TORCH_CHECK_VALUE(ok, "sparsekern: ", name, " must be NHWC rows [", N * h * w, ", ", C,
                    "] or NCHW [", N, ", ", C, ", ", h, ", ", w, "], got ", a.sizes());
}

inline ConvGeometry check_dds_conv_args(const at::Tensor& a, const at::Tensor& values,
                                        const at::Tensor& row_offsets, const at::Tensor& col_idx,
                                        const at::Tensor& t_offsets, const at::Tensor& t_rows,
                                        const at::Tensor& t_perm, int64_t n_rows, int64_t n_cols,
                                        bool trans_w, at::IntArrayRef conv,
                                        c10::DeviceType device) {
  check_dds_topology(a, values, row_offsets, col_idx, t_offsets, t_rows, t_perm, n_rows, n_cols,
                     trans_w, device, 0);
  const ConvGeometry g = check_conv_geometry(conv, n_cols, values.size(2));
  if (trans_w)
    check_conv_activation(a, "conv input", g.N, g.C, g.H, g.W);
  else
    check_conv_activation(a, "conv grad output", g.N, n_rows, g.P, g.Q);
  return g;
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

inline ConvGeometry check_sdd_conv_args(const at::Tensor& a, const at::Tensor& b,
                                        const at::Tensor& row_idx, const at::Tensor& col_idx,
                                        int64_t bm, int64_t bk, at::IntArrayRef conv,
                                        c10::DeviceType device) {
  TORCH_CHECK_VALUE(bm > 0 && bk > 0, "sparsekern: block shape must be positive");
  TORCH_CHECK_VALUE(conv.size() == 14, "sparsekern: conv geometry must have 14 values");
  const int64_t n_cols = conv[4] * conv[5] * conv[3];
  const ConvGeometry g = check_conv_geometry(conv, n_cols, bk);
  check_dense(a, "sdd left operand", a.scalar_type(), device, 0);
  check_dense(b, "sdd right operand", a.scalar_type(), device, a.dim());
  TORCH_CHECK_VALUE(a.dim() == 2 || a.dim() == 4, "sparsekern: conv sdd operands must be NHWC "
                    "rows or NCHW, got shape ", a.sizes());
  const int64_t Mp = a.size(1);
  TORCH_CHECK_VALUE(Mp % bm == 0, "sparsekern: conv sdd left operand has ", Mp,
                    " channels, not a multiple of the block height ", bm);
  check_conv_activation(a, "conv sdd left operand (grad output)", g.N, Mp, g.P, g.Q);
  check_conv_activation(b, "conv sdd right operand (input)", g.N, g.C, g.H, g.W);
  const int64_t nnz = row_idx.numel();
  check_index_tensor(row_idx, "row_idx", nnz, device);
  check_index_tensor(col_idx, "col_idx", nnz, device);
  const at::Tensor r = row_idx.cpu(), c = col_idx.cpu();
  const int32_t *rp = r.data_ptr<int32_t>(), *cp = c.data_ptr<int32_t>();
  const int64_t n_brows = a.size(1) / bm, n_bcols = n_cols / bk;
  for (int64_t p = 0; p < nnz; ++p)
    TORCH_CHECK_INDEX(rp[p] >= 0 && rp[p] < n_brows && cp[p] >= 0 && cp[p] < n_bcols,
                      "sparsekern: block (", rp[p], ", ", cp[p], ") at position ", p,
                      " is out of range for a ", n_brows, " x ", n_bcols, " block grid");
  return g;
}

}  // namespace sparsekern
