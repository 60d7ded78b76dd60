// Conv2d on the implicit-GEMM view, CPU. The output pixels are processed in chunks: for each
// chunk the NHWC input rows it reads are packed into a [chunk, R*S*C] tile (zeros for padding),
// and the linear kernels run on the tile; nothing of the size of a full im2col buffer is built.
//   forward  y[N*P*Q, C_out]   = tile @ W^T                    (dds, trans_w=True)
//   grad x   dx[N*H*W, C]      = col2im-add(dy_chunk @ W)      (dds, trans_w=False)
//   grad W   dW[nnz, bm, bk]  += sdd(dy_chunk, tile)           (sdd)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>

#include "ops_cpu.h"

namespace sparsekern {
namespace {

// Tile rows: about 4 MB of tile, at least 64 rows.
int64_t chunk_rows(const ConvGeometry& g) {
  const int64_t width = g.R * g.S * g.C;
  return std::max<int64_t>(64, (int64_t(1) << 20) / std::max<int64_t>(width, 1));
}

// Calls fn(tile_row, input_row_or_-1, tap) for each tap of output pixel o.
template <typename F>
inline void for_each_tap(const ConvGeometry& g, int64_t o, const F& fn) {
  const int64_t n = o / (g.P * g.Q), pq = o % (g.P * g.Q), p = pq / g.Q, q = pq % g.Q;
  for (int64_t r = 0; r < g.R; ++r) {
    const int64_t ih = p * g.sh - g.ph + r * g.dh;
    for (int64_t s = 0; s < g.S; ++s) {
      const int64_t iw = q * g.sw - g.pw + s * g.dw;
      const bool inside = ih >= 0 && ih < g.H && iw >= 0 && iw < g.W;
      fn(inside ? (n * g.H + ih) * g.W + iw : -1, r * g.S + s);
    }
  }
}

template <typename T>
at::Tensor pack_tile(const at::Tensor& x, const ConvGeometry& g, int64_t o0, int64_t rows) {
  const int64_t width = g.R * g.S * g.C, C = g.C;
  at::Tensor tile = at::empty({rows, width}, x.options());
  const T* src = x.data_ptr<T>();
  T* dst = tile.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for_each_tap(g, o0 + t, [&](int64_t in_row, int64_t tap) {
        T* d = dst + t * width + tap * C;
        if (in_row < 0)
          std::memset(d, 0, C * sizeof(T));
        else
          std::memcpy(d, src + in_row * C, C * sizeof(T));
      });
  });
  return tile;
}

// dx[in_row, :] += dcol[t, tap*C : (tap+1)*C]; threads split the channels (no two write the same
// element, whatever the overlap of the taps).
template <typename T>
void col2im_add(const at::Tensor& dcol, at::Tensor& dx, const ConvGeometry& g, int64_t o0) {
  const int64_t rows = dcol.size(0), width = g.R * g.S * g.C, C = g.C;
  const T* src = dcol.data_ptr<T>();
  T* dst = dx.data_ptr<T>();
  at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t t = 0; t < rows; ++t)
      for_each_tap(g, o0 + t, [&](int64_t in_row, int64_t tap) {
        if (in_row < 0) return;
        const T* s = src + t * width + tap * C;
        T* d = dst + in_row * C;
        for (int64_t c = c0; c < c1; ++c) d[c] += s[c];
      });
  });
}

}  // namespace

at::Tensor dds_conv_cpu(const at::Tensor& a, const at::Tensor& values,
                        const at::Tensor& row_offsets, const at::Tensor& col_idx,
                        const at::Tensor& t_offsets, const at::Tensor& t_rows,
                        const at::Tensor& t_perm, int64_t n_rows, int64_t n_cols, bool trans_w,
                        const ConvGeometry& g) {
  const at::Tensor ac = a.contiguous();
  const int64_t chunk = chunk_rows(g), out_rows = g.out_rows();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparsekern_dds_conv_cpu", [&] {
    if (trans_w) {
      out = at::empty({out_rows, n_rows}, a.options());
      for (int64_t o0 = 0; o0 < out_rows; o0 += chunk) {
        const int64_t rows = std::min(chunk, out_rows - o0);
        const at::Tensor tile = pack_tile<scalar_t>(ac, g, o0, rows);
        out.narrow(0, o0, rows).copy_(dds_linear_cpu(tile, values, row_offsets, col_idx,
                                                     t_offsets, t_rows, t_perm, n_rows, n_cols,
                                                     true));
      }
    } else {
      out = at::zeros({g.in_rows(), g.C}, a.options());
      for (int64_t o0 = 0; o0 < out_rows; o0 += chunk) {
        const int64_t rows = std::min(chunk, out_rows - o0);
        const at::Tensor dcol = dds_linear_cpu(ac.narrow(0, o0, rows), values, row_offsets,
                                               col_idx, t_offsets, t_rows, t_perm, n_rows,
                                               n_cols, false);
        col2im_add<scalar_t>(dcol, out, g, o0);
      }
    }
  });
  return out;
}

at::Tensor sdd_conv_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_idx,
                        const at::Tensor& col_idx, int64_t bm, int64_t bk, const ConvGeometry& g) {
  const at::Tensor bc = b.contiguous();
  const int64_t chunk = chunk_rows(g), out_rows = g.out_rows();
  at::Tensor out = at::zeros({row_idx.numel(), bm, bk}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparsekern_sdd_conv_cpu", [&] {
    for (int64_t o0 = 0; o0 < out_rows; o0 += chunk) {
      const int64_t rows = std::min(chunk, out_rows - o0);
      const at::Tensor tile = pack_tile<scalar_t>(bc, g, o0, rows);
      out.add_(sdd_linear_cpu(a.narrow(0, o0, rows), tile, row_idx, col_idx, bm, bk));
    }
  });
  return out;
}

}  // namespace sparsekern
