// Conv2d on the implicit-GEMM view, CPU. Output pixels are processed in tiles: for each tile the
// NHWC input rows it reads are packed into a [tile, R*S*C] buffer (zeros for padding) and the
// linear micro-kernels run on it; nothing of the size of a full im2col buffer is built.
//   forward  y[N*P*Q, C_out]   = tile @ W^T                    (dds, trans_w=True)
//   grad x   dx[N*H*W, C]      = col2im-add(dy_tile @ W)       (dds, trans_w=False)
//   grad W   dW[nnz, bm, bk]  += sdd(dy_tile, tile)            (sdd)
// Fast path (block widths a multiple of the vector length): small tiles, one per thread at a
// time, packed and consumed while in L2 (threads own tiles, images for grad x, private dW
// accumulators for grad W). Other block shapes: larger tiles through the generic linear entry
// points, whose kernels parallelize inside.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

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
void pack_rows(const T* x, const ConvGeometry& g, int64_t o0, int64_t rows, T* dst) {
  const int64_t width = g.R * g.S * g.C, C = g.C;
  for (int64_t t = 0; t < rows; ++t)
    for_each_tap(g, o0 + t, [&](int64_t in_row, int64_t tap) {
      T* d = dst + t * width + tap * C;  // plain loops: C can be 1 (LeNet), a call per tap is slow
      const T* src = in_row < 0 ? nullptr : x + in_row * C;
      if (src)
        for (int64_t c = 0; c < C; ++c) d[c] = src[c];
      else
        for (int64_t c = 0; c < C; ++c) d[c] = T(0);
    });
}

template <typename T>
at::Tensor pack_tile(const at::Tensor& x, const ConvGeometry& g, int64_t o0, int64_t rows) {
  const int64_t width = g.R * g.S * g.C;
  at::Tensor tile = at::empty({rows, width}, x.options());
  at::parallel_for(0, rows, 16, [&](int64_t t0, int64_t t1) {
    pack_rows(x.data_ptr<T>(), g, o0 + t0, t1 - t0, tile.data_ptr<T>() + t0 * width);
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

constexpr int64_t kTileRows = 64;

// y = x * W on tiles of kTileRows output pixels, each thread its own tiles. W's blocks are
// transposed once ([nnz, bk, bm]) so the column kernel walks them by block row.
template <typename T>
at::Tensor conv_forward_tiles(const at::Tensor& x, const at::Tensor& values,
                              const at::Tensor& row_offsets, const at::Tensor& col_idx,
                              int64_t n_rows, const ConvGeometry& g) {
  const KernelTable<T> kt = select_kernels<T>();
  const int64_t width = g.R * g.S * g.C, out_rows = g.out_rows();
  const int64_t bm = values.size(1), bk = values.size(2);
  const at::Tensor vt = values.transpose(1, 2).contiguous();
  at::Tensor y = at::empty({out_rows, n_rows}, x.options());
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t n_tiles = (out_rows + kTileRows - 1) / kTileRows;
  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> tile(kTileRows * width);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * kTileRows, rows = std::min(kTileRows, out_rows - o0);
      pack_rows(xp, g, o0, rows, tile.data());
      ColumnArgs<T> args{vt.data_ptr<T>(), row_offsets.data_ptr<int32_t>(),
                         col_idx.data_ptr<int32_t>(), nullptr, bk, bm, tile.data(), width,
                         yp + o0 * n_rows, n_rows};
      for (int64_t j = 0; j < n_rows / bm; ++j) kt.dds_columns(args, j, 0, rows);
    }
  });
  return y;
}

// dx = col2im(dy W): threads own whole images, so the scatter-adds never race.
template <typename T>
at::Tensor conv_grad_input_tiles(const at::Tensor& dy, const at::Tensor& values,
                                 const at::Tensor& t_offsets, const at::Tensor& t_rows,
                                 const at::Tensor& t_perm, int64_t n_rows,
                                 const ConvGeometry& g) {
  const KernelTable<T> kt = select_kernels<T>();
  const int64_t width = g.R * g.S * g.C, PQ = g.P * g.Q;
  const int64_t bm = values.size(1), bk = values.size(2);
  at::Tensor dx = at::zeros({g.in_rows(), g.C}, dy.options());
  const T* dyp = dy.data_ptr<T>();
  at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
    at::Tensor dcol = at::empty({kTileRows, width}, dy.options());
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t o0 = n * PQ; o0 < (n + 1) * PQ; o0 += kTileRows) {
        const int64_t rows = std::min(kTileRows, (n + 1) * PQ - o0);
        ColumnArgs<T> args{values.data_ptr<T>(), t_offsets.data_ptr<int32_t>(),
                           t_rows.data_ptr<int32_t>(), t_perm.data_ptr<int32_t>(), bm, bk,
                           dyp + o0 * n_rows, n_rows, dcol.data_ptr<T>(), width};
        for (int64_t j = 0; j < width / bk; ++j) kt.dds_columns(args, j, 0, rows);
        col2im_add<T>(dcol.narrow(0, 0, rows), dx, g, o0);  // serial: inside a parallel region
      }
  });
  return dx;
}

// dW = sum over tiles of sdd(dy_tile, tile), one private accumulator per thread.
template <typename T>
at::Tensor conv_grad_values_tiles(const at::Tensor& dy, const at::Tensor& x,
                                  const at::Tensor& row_idx, const at::Tensor& col_idx,
                                  int64_t bm, int64_t bk, const ConvGeometry& g) {
  const KernelTable<T> kt = select_kernels<T>();
  const int64_t width = g.R * g.S * g.C, out_rows = g.out_rows(), nnz = row_idx.numel();
  const int64_t n_threads = at::get_num_threads();
  std::vector<at::Tensor> partial(n_threads);
  const int64_t n_tiles = (out_rows + kTileRows - 1) / kTileRows;
  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor acc = at::zeros({nnz, bm, bk}, dy.options());
    std::vector<T> tile(kTileRows * width);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * kTileRows, rows = std::min(kTileRows, out_rows - o0);
      pack_rows(x.data_ptr<T>(), g, o0, rows, tile.data());
      SddArgs<T> args{dy.data_ptr<T>() + o0 * dy.stride(0), tile.data(),
                      row_idx.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(), bm, bk,
                      acc.data_ptr<T>(), width, dy.stride(0), rows, true};
      for (int64_t p = 0; p < nnz; ++p) kt.sdd_batch_major(args, p);
    }
    partial[at::get_thread_num()] = acc;
  });
  at::Tensor out = at::zeros({nnz, bm, bk}, dy.options());
  for (const at::Tensor& p : partial)
    if (p.defined()) out.add_(p);
  return out;
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
    const int64_t vec_len = select_kernels<scalar_t>().vec_len;
    const at::Tensor v = values.contiguous();
    if (trans_w && v.size(1) % vec_len == 0) {
      out = conv_forward_tiles<scalar_t>(ac, v, row_offsets, col_idx, n_rows, g);
    } else if (!trans_w && v.size(2) % vec_len == 0) {
      out = conv_grad_input_tiles<scalar_t>(ac, v, t_offsets, t_rows, t_perm, n_rows, g);
    } else if (trans_w) {
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
    if (bk % select_kernels<scalar_t>().vec_len == 0) {
      out = conv_grad_values_tiles<scalar_t>(a.contiguous(), bc, row_idx, col_idx, bm, bk, g);
      return;
    }
    for (int64_t o0 = 0; o0 < out_rows; o0 += chunk) {
      const int64_t rows = std::min(chunk, out_rows - o0);
      const at::Tensor tile = pack_tile<scalar_t>(bc, g, o0, rows);
      out.add_(sdd_linear_cpu(a.narrow(0, o0, rows), tile, row_idx, col_idx, bm, bk));
    }
  });
  return out;
}

}  // namespace sparsekern
