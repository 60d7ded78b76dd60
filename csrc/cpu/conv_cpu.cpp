// Conv2d on the implicit-GEMM view, CPU, without building im2col buffers:
//   forward  y[N*P*Q, C_out]   = im2col(x) @ W^T            (dds, trans_w=True)
//   grad x   dx[N*H*W, C]      = col2im(dy @ W)             (dds, trans_w=False)
//   grad W   dW[nnz, bm, bk]   = sdd(dy, im2col(x))         (sdd)
// Activations come as NHWC rows or as NCHW tensors (checks.h); each path reads and writes the
// layout it is given, converting only cache-sized pieces.
// Fast path (block widths a multiple of the vector length): "direct" — the batch-major kernels
// read a per-thread zero-padded copy of the image in place (PaddedInput), 64 output pixels at a
// time; grad x in gather form at stride 1, else dcol tiles of the used block columns and
// col2im scatter-adds. Narrower blocks at stride 1: the channel-major "shifted image" path.
// Others: packed im2col tiles through the generic linear entry points, whose kernels
// parallelize inside.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
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

// The block columns of the implicit-GEMM matrix (width bk: input channels [cb*bk, cb*bk + bk)
// at filter tap `tap`, index tap * C/bk + cb) that the tile loops touch. At 90% block sparsity
// most block columns of a 3x3 layer hold no stored block: packing, computing and scattering
// only the listed ones is what keeps a sparse layer from costing like a dense im2col.
struct BlockColumns {
  struct Column {
    int64_t j;       // block column index
    int64_t dh, dw;  // the tap's input offsets (r * dil_h, s * dil_w)
    int64_t at;      // first element in an im2col row: tap * C + c0
    int64_t c0;      // first channel
  };
  std::vector<Column> cols;
  int64_t bk;

  BlockColumns(const ConvGeometry& g, int64_t bk_, const std::vector<uint8_t>& flags) : bk(bk_) {
    const int64_t n_cb = g.C / bk;
    for (int64_t j = 0; j < (int64_t)flags.size(); ++j) {
      if (!flags[j]) continue;
      const int64_t tap = j / n_cb, c0 = (j % n_cb) * bk;
      cols.push_back({j, (tap / g.S) * g.dh, (tap % g.S) * g.dw, tap * g.C + c0, c0});
    }
  }
  // Every filter tap as one column of width C (the generic path).
  static BlockColumns all_taps(const ConvGeometry& g) {
    return BlockColumns(g, g.C, std::vector<uint8_t>(g.R * g.S, 1));
  }
  // The columns with entries in CSR offsets over block columns (t_offsets).
  static BlockColumns of_offsets(const at::Tensor& offsets, const ConvGeometry& g, int64_t bk) {
    const int32_t* o = offsets.data_ptr<int32_t>();
    std::vector<uint8_t> flags(offsets.numel() - 1);
    for (int64_t j = 0; j + 1 < offsets.numel(); ++j) flags[j] = o[j + 1] > o[j];
    return BlockColumns(g, bk, flags);
  }
};

// Calls fn(in_row_or_-1, at, c0, c1) for each listed block column of output pixel o: the input
// pixel it reads (-1 in the padding), where it sits in an im2col row and its channel range.
// (No divisions per column: this runs for every packed element row.)
template <typename F>
inline void for_each_column(const ConvGeometry& g, const BlockColumns& bc, int64_t o,
                            const F& fn) {
  const int64_t n = o / (g.P * g.Q), pq = o % (g.P * g.Q), p = pq / g.Q, q = pq % g.Q;
  const int64_t h0 = p * g.sh - g.ph, w0 = q * g.sw - g.pw, image_row0 = n * g.H;
  for (const BlockColumns::Column& c : bc.cols) {
    const int64_t ih = h0 + c.dh, iw = w0 + c.dw;
    const bool inside = ih >= 0 && ih < g.H && iw >= 0 && iw < g.W;
    fn(inside ? (image_row0 + ih) * g.W + iw : -1, c.at, c.c0, c.c0 + bc.bk);
  }
}

// Packs the listed block columns of the implicit im2col rows of output pixels [o0, o0 + rows)
// into dst [rows, R*S*C] (zeros for padding); the other columns are left unwritten.
template <typename T>
void pack_rows(const T* x, const ConvGeometry& g, const BlockColumns& bc, int64_t o0,
               int64_t rows, T* dst) {
  const int64_t width = g.R * g.S * g.C, C = g.C;
  for (int64_t t = 0; t < rows; ++t)
    for_each_column(g, bc, o0 + t, [&](int64_t in_row, int64_t at, int64_t c0, int64_t c1) {
      T* d = dst + t * width + at - c0;
      const T* src = in_row < 0 ? nullptr : x + in_row * C;
      if (c1 - c0 >= 16) {  // libc's memcpy/memset use the CPU's widest vectors; this file
        if (src)            // is compiled for the baseline ISA
          std::memcpy(d + c0, src + c0, (c1 - c0) * sizeof(T));
        else
          std::memset(d + c0, 0, (c1 - c0) * sizeof(T));
      } else if (src) {  // narrow columns (C can be 1, LeNet): a call per column is slow
        for (int64_t c = c0; c < c1; ++c) d[c] = src[c];
      } else {
        for (int64_t c = c0; c < c1; ++c) d[c] = T(0);
      }
    });
}

template <typename T>
at::Tensor pack_tile(const at::Tensor& x, const ConvGeometry& g, int64_t o0, int64_t rows) {
  const int64_t width = g.R * g.S * g.C;
  const BlockColumns taps = BlockColumns::all_taps(g);
  at::Tensor tile = at::empty({rows, width}, x.options());
  at::parallel_for(0, rows, 16, [&](int64_t t0, int64_t t1) {
    pack_rows(x.data_ptr<T>(), g, taps, o0 + t0, t1 - t0, tile.data_ptr<T>() + t0 * width);
  });
  return tile;
}

// dx[in_row, c] += dcol[t, tap*C + c] over the listed block columns, for channels c in
// [c_lo, c_hi) (callers that split the channels between threads never write the same element,
// whatever the overlap of the taps).
template <typename T>
void col2im_add(const T* dcol, int64_t rows, T* dx, const ConvGeometry& g, const BlockColumns& bc,
                int64_t o0, int64_t c_lo, int64_t c_hi) {
  static const KernelTable<T> kt = select_kernels<T>();
  const int64_t width = g.R * g.S * g.C, C = g.C;
  for (int64_t t = 0; t < rows; ++t)
    for_each_column(g, bc, o0 + t, [&](int64_t in_row, int64_t at, int64_t c0, int64_t c1) {
      if (in_row < 0) return;
      const T* s = dcol + t * width + at - c0;
      T* d = dx + in_row * C;
      const int64_t lo = std::max(c0, c_lo), hi = std::min(c1, c_hi);
      if (hi - lo >= 16)
        kt.add(d + lo, s + lo, hi - lo);
      else
        for (int64_t c = lo; c < hi; ++c) d[c] += s[c];
    });
}

// load: from a tensor into a per-thread buffer; else from a buffer into a tensor.
template <typename T>
inline void transpose(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows,
                      int64_t cols, bool load) {
  static const KernelTable<T> kt = select_kernels<T>();
  kt.transpose(src, lds, dst, ldd, rows, cols, load);
}

// ---- direct path: blocks a multiple of the vector length wide --------------------------------
// Work goes image by image in tiles of at most kTileRows output pixels. Activations are NHWC
// rows or NCHW (`nchw`); for NCHW each thread converts the images it works on (input, grad
// output, grad input) and its output tiles in its own buffers, which stay in cache, so no
// converted copy of a whole tensor goes through memory.
constexpr int64_t kTileRows = 64;

// The NHWC rows [hw, c] of image n of an activation: a pointer into it for NHWC rows, else a
// per-thread copy of the NCHW image [c, hw], converted when the image changes.
template <typename T>
class ImageRows {
 public:
  ImageRows(const T* act, int64_t hw, int64_t c, bool nchw)
      : act_(act), hw_(hw), c_(c), nchw_(nchw), buf_(nchw ? hw * c : 0) {}
  const T* operator()(int64_t n) {
    if (!nchw_) return act_ + n * hw_ * c_;
    if (n != n_) transpose(act_ + n * c_ * hw_, hw_, buf_.data(), c_, c_, hw_, true);
    n_ = n;
    return buf_.data();
  }

 private:
  const T* act_;
  int64_t hw_, c_;
  bool nchw_;
  std::vector<T> buf_;
  int64_t n_ = -1;
};

// An uninitialized activation of N images, C channels, h x w: NCHW [N, C, h, w] or NHWC rows
// [N*h*w, C].
at::Tensor empty_activation(int64_t N, int64_t C, int64_t h, int64_t w, bool nchw,
                            const at::TensorOptions& options) {
  return nchw ? at::empty({N, C, h, w}, options) : at::empty({N * h * w, C}, options);
}

// One image of the geometry (tiles index pixels within their image).
ConvGeometry single_image(const ConvGeometry& g) {
  ConvGeometry one = g;
  one.N = 1;
  return one;
}

// rows x [rows, ld] += bias [cols] (a tile in cache: the bias costs no pass over memory).
template <typename T>
void add_bias_rows(T* y, int64_t ld, int64_t rows, int64_t cols, const T* bias) {
  static const KernelTable<T> kt = select_kernels<T>();
  for (int64_t t = 0; t < rows; ++t) kt.add(y + t * ld, bias, cols);
}

// The zero-padded NHWC image [Hp, Wp, C] of image n of an activation (NHWC rows or NCHW), a
// per-thread copy refreshed when n changes; the border is zeroed once. Pixel (h, w) of the
// image sits at ((h + top) * Wp + w + left) * C. With a mask (laid out as the activation) the
// copy keeps act where mask > 0 and zeros elsewhere: the backward of a ReLU whose output is the
// mask, at no extra pass over memory.
template <typename T>
class PaddedImage {
 public:
  PaddedImage(const T* act, int64_t H, int64_t W, int64_t C, int64_t top, int64_t left,
              int64_t Hp, int64_t Wp, bool nchw, const T* mask = nullptr)
      : act_(act), mask_(mask), H_(H), W_(W), C_(C), top_(top), left_(left), Wp_(Wp),
        nchw_(nchw), buf_(Hp * Wp * C, T(0)), mask_row_(mask && nchw ? W * C : 0) {}
  const T* operator()(int64_t n) {
    static const KernelTable<T> kt = select_kernels<T>();
    if (n == n_) return buf_.data();
    n_ = n;
    for (int64_t h = 0; h < H_; ++h) {
      T* d = buf_.data() + ((h + top_) * Wp_ + left_) * C_;
      const int64_t at = (n * H_ + h) * W_ * C_;
      if (nchw_) {  // image row h of every channel -> [W, C]
        transpose(act_ + n * C_ * H_ * W_ + h * W_, H_ * W_, d, C_, C_, W_, true);
        if (mask_) {
          transpose(mask_ + n * C_ * H_ * W_ + h * W_, H_ * W_, mask_row_.data(), C_, C_, W_,
                    true);
          kt.masked_copy(d, d, mask_row_.data(), W_ * C_);
        }
      } else if (mask_) {
        kt.masked_copy(d, act_ + at, mask_ + at, W_ * C_);
      } else {
        std::memcpy(d, act_ + at, W_ * C_ * sizeof(T));
      }
    }
    return buf_.data();
  }

 private:
  const T* act_;
  const T* mask_;
  int64_t H_, W_, C_, top_, left_, Wp_;
  bool nchw_;
  std::vector<T> buf_;
  std::vector<T> mask_row_;  // NCHW masks: one image row, transposed like the activation's
  int64_t n_ = -1;
};

// Direct addressing of the padded input image [Hp, Wp, C] (Hp = H + 2*ph, Wp = W + 2*pw):
// output pixel (p, q) at tap (r, s) reads padded pixel (p*sh + r*dh, q*sw + s*dw), i.e. the
// pixel's own offset plus a fixed offset per block column, whatever the stride and dilation.
struct PaddedInput {
  int64_t Hp, Wp;
  std::vector<int64_t> pixel;  // [P*Q] offset of output pixel pq's tap (0, 0) input
  explicit PaddedInput(const ConvGeometry& g)
      : Hp(g.H + 2 * g.ph), Wp(g.W + 2 * g.pw), pixel(g.P * g.Q) {
    for (int64_t pq = 0; pq < g.P * g.Q; ++pq)
      pixel[pq] = ((pq / g.Q) * g.sh * Wp + (pq % g.Q) * g.sw) * g.C;
  }
  // Offsets of the blocks' columns: block column j holds channels [cb*bk, cb*bk + bk) of tap
  // j / (C/bk).
  std::vector<int64_t> columns(const ConvGeometry& g, const at::Tensor& col_idx, int64_t bk) const {
    const int64_t n_cb = g.C / bk;
    const int32_t* cols = col_idx.data_ptr<int32_t>();
    std::vector<int64_t> off(col_idx.numel());
    for (int64_t e = 0; e < col_idx.numel(); ++e) {
      const int64_t tap = cols[e] / n_cb;
      off[e] = ((tap / g.S) * g.dh * Wp + (tap % g.S) * g.dw) * g.C + (cols[e] % n_cb) * bk;
    }
    return off;
  }
  template <typename T>
  PaddedImage<T> image(const T* x, const ConvGeometry& g, bool nchw) const {
    return PaddedImage<T>(x, g.H, g.W, g.C, g.ph, g.pw, Hp, Wp, nchw);
  }
};

// y = x * W (+ bias, or nullptr; then ReLU if relu), straight from padded images (PaddedInput);
// W's blocks are transposed once ([nnz, bk, bm]) so the column kernel walks them by block row.
// Tiles of output pixels, image by image.
template <typename T>
at::Tensor conv_forward_direct(const at::Tensor& x, const at::Tensor& values,
                               const at::Tensor& row_offsets, const at::Tensor& col_idx,
                               int64_t n_rows, const ConvGeometry& g, bool nchw, const T* bias,
                               bool relu) {
  const KernelTable<T> kt = select_kernels<T>();
  const int64_t PQ = g.P * g.Q, bm = values.size(1), bk = values.size(2);
  const int64_t tiles_per_image = (PQ + kTileRows - 1) / kTileRows;
  const at::Tensor vt = values.transpose(1, 2).contiguous();
  const PaddedInput padded(g);
  const std::vector<int64_t> a_off = padded.columns(g, col_idx, bk);
  at::Tensor y = empty_activation(g.N, n_rows, g.P, g.Q, nchw, x.options());
  T* yp = y.data_ptr<T>();
  parallel_chunks(g.N * tiles_per_image, tiles_per_image, [&](const auto& claim) {
    std::vector<T> y_tile(nchw ? kTileRows * n_rows : 0);
    PaddedImage<T> image = padded.image(x.data_ptr<T>(), g, nchw);
    for (int64_t i0, i1; claim(i0, i1);)
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / tiles_per_image, pq0 = (i % tiles_per_image) * kTileRows;
        const int64_t rows = std::min(kTileRows, PQ - pq0);
        T* out = nchw ? y_tile.data() : yp + (n * PQ + pq0) * n_rows;
        ColumnArgs<T> args{vt.data_ptr<T>(), row_offsets.data_ptr<int32_t>(),
                           col_idx.data_ptr<int32_t>(), nullptr, bk, bm, image(n), 0, out, n_rows};
        args.a_row = padded.pixel.data() + pq0;
        args.a_off = a_off.data();
        for (int64_t j = 0; j < n_rows / bm; ++j) kt.dds_columns(args, j, 0, rows);
        if (bias) add_bias_rows(out, n_rows, rows, n_rows, bias);
        if (relu) kt.relu(out, rows * n_rows);  // the tile is still in cache
        if (nchw) transpose(out, n_rows, yp + n * n_rows * PQ + pq0, PQ, rows, n_rows, false);
      }
  });
  return y;
}

// dW = sum over tiles of output pixels of sdd(dy_tile, x read straight from padded images),
// one private accumulator per thread.
template <typename T>
at::Tensor conv_grad_values_direct(const at::Tensor& dy, const at::Tensor& x,
                                   const at::Tensor& row_idx, const at::Tensor& col_idx,
                                   int64_t bm, int64_t bk, const ConvGeometry& g, bool nchw) {
  const KernelTable<T> kt = select_kernels<T>();
  const int64_t PQ = g.P * g.Q, nnz = row_idx.numel(), n_rows = dy.size(1);
  const int64_t tiles_per_image = (PQ + kTileRows - 1) / kTileRows;
  const PaddedInput padded(g);
  const std::vector<int64_t> b_off = padded.columns(g, col_idx, bk);
  std::vector<at::Tensor> partial(at::get_num_threads());
  const T* dyp = dy.data_ptr<T>();
  parallel_chunks(g.N * tiles_per_image, tiles_per_image, [&](const auto& claim) {
    at::Tensor acc = at::zeros({nnz, bm, bk}, dy.options());
    PaddedImage<T> image = padded.image(x.data_ptr<T>(), g, nchw);
    ImageRows<T> dy_image(dyp, PQ, n_rows, nchw);
    for (int64_t i0, i1; claim(i0, i1);)
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / tiles_per_image, pq0 = (i % tiles_per_image) * kTileRows;
        SddArgs<T> args{dy_image(n) + pq0 * n_rows, image(n), row_idx.data_ptr<int32_t>(),
                        col_idx.data_ptr<int32_t>(), bm, bk, acc.data_ptr<T>(), 0, n_rows,
                        std::min(kTileRows, PQ - pq0), true};
        args.b_row = padded.pixel.data() + pq0;
        args.b_off = b_off.data();
        for (int64_t p = 0; p < nnz; ++p) kt.sdd_batch_major(args, p);
      }
    partial[at::get_thread_num()] = acc;
  });
  at::Tensor out = at::zeros({nnz, bm, bk}, dy.options());
  for (const at::Tensor& p : partial)
    if (p.defined()) out.add_(p);
  return out;
}

// Stride 1: dx = dy * W in gather form, read straight from a padded dy image. Input pixel
// (h, w) at tap (r, s) receives from output pixel (h + ph - r*dh, w + pw - s*dw), a fixed offset
// per tap, so each block column of dx (channels [cb*bk, cb*bk + bk)) is one segment listing its
// blocks at every tap, computed once and stored: no zero fill, no im2col tile, no scatter-adds.
// relu_mask (laid out as dy, or nullptr): dy is zeroed where the mask is not > 0, in the copy.
template <typename T>
at::Tensor conv_grad_input_direct(const at::Tensor& dy, const at::Tensor& values,
                                  const at::Tensor& t_offsets, const at::Tensor& t_rows,
                                  const at::Tensor& t_perm, int64_t n_rows,
                                  const ConvGeometry& g, bool nchw, const T* relu_mask) {
  const KernelTable<T> kt = select_kernels<T>();
  const int64_t HW = g.H * g.W, bm = values.size(1), bk = values.size(2), n_cb = g.C / bk;
  // dy's padding: rows from ph - (R-1)*dh to H - 1 + ph are read (likewise columns)
  const int64_t top = std::max<int64_t>(0, (g.R - 1) * g.dh - g.ph);
  const int64_t left = std::max<int64_t>(0, (g.S - 1) * g.dw - g.pw);
  const int64_t Hd = top + std::max(g.P, g.H + g.ph), Wd = left + std::max(g.Q, g.W + g.pw);
  std::vector<int32_t> seg_offsets(n_cb + 1, 0), perm;
  std::vector<int64_t> a_off, a_row(HW);
  const int32_t *toff = t_offsets.data_ptr<int32_t>(), *trow = t_rows.data_ptr<int32_t>(),
                *tperm = t_perm.data_ptr<int32_t>();
  for (int64_t cb = 0; cb < n_cb; ++cb) {
    for (int64_t tap = 0; tap < g.R * g.S; ++tap) {
      const int64_t col = tap * n_cb + cb;
      const int64_t shift = ((tap / g.S) * g.dh * Wd + (tap % g.S) * g.dw) * n_rows;
      for (int64_t e = toff[col]; e < toff[col + 1]; ++e) {
        perm.push_back(tperm[e]);
        a_off.push_back(trow[e] * bm - shift);
      }
    }
    seg_offsets[cb + 1] = (int32_t)perm.size();
  }
  for (int64_t hw = 0; hw < HW; ++hw)
    a_row[hw] = ((hw / g.W + g.ph + top) * Wd + hw % g.W + g.pw + left) * n_rows;
  const int64_t tiles_per_image = (HW + kTileRows - 1) / kTileRows;
  at::Tensor dx = empty_activation(g.N, g.C, g.H, g.W, nchw, dy.options());
  T* dxp = dx.data_ptr<T>();
  parallel_chunks(g.N * tiles_per_image, tiles_per_image, [&](const auto& claim) {
    std::vector<T> dx_tile(nchw ? kTileRows * g.C : 0);
    PaddedImage<T> image(dy.data_ptr<T>(), g.P, g.Q, n_rows, top, left, Hd, Wd, nchw, relu_mask);
    for (int64_t i0, i1; claim(i0, i1);)
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / tiles_per_image, hw0 = (i % tiles_per_image) * kTileRows;
        const int64_t rows = std::min(kTileRows, HW - hw0);
        T* out = nchw ? dx_tile.data() : dxp + (n * HW + hw0) * g.C;
        ColumnArgs<T> args{values.data_ptr<T>(), seg_offsets.data(), nullptr, perm.data(), bm,
                           bk, image(n), 0, out, g.C};
        args.a_row = a_row.data() + hw0;
        args.a_off = a_off.data();
        for (int64_t cb = 0; cb < n_cb; ++cb) kt.dds_columns(args, cb, 0, rows);
        if (nchw) transpose(out, g.C, dxp + n * g.C * HW + hw0, HW, rows, g.C, false);
      }
  });
  return dx;
}

// Stride > 1: dx = col2im(dy W) over dcol tiles of the used block columns; threads own whole
// images, so the scatter-adds never race.
template <typename T>
at::Tensor conv_grad_input_tiles(const at::Tensor& dy, const at::Tensor& values,
                                 const at::Tensor& t_offsets, const at::Tensor& t_rows,
                                 const at::Tensor& t_perm, int64_t n_rows,
                                 const ConvGeometry& g, bool nchw) {
  const KernelTable<T> kt = select_kernels<T>();
  const int64_t width = g.R * g.S * g.C, PQ = g.P * g.Q, HW = g.H * g.W;
  const int64_t bm = values.size(1), bk = values.size(2);
  const ConvGeometry one = single_image(g);
  const BlockColumns used = BlockColumns::of_offsets(t_offsets, g, bk);
  at::Tensor dx = empty_activation(g.N, g.C, g.H, g.W, nchw, dy.options());
  const T* dyp = dy.data_ptr<T>();
  T* dxp = dx.data_ptr<T>();
  parallel_chunks(g.N, 1, [&](const auto& claim) {
    std::vector<T> dcol(kTileRows * width), dx_image(nchw ? HW * g.C : 0);
    ImageRows<T> dy_image(dyp, PQ, n_rows, nchw);
    for (int64_t n0, n1; claim(n0, n1);)
      for (int64_t n = n0; n < n1; ++n) {
        const T* dyi = dy_image(n);
        // Zero this image just before its scatter-adds, while it is going to stay in cache.
        T* dxi = nchw ? dx_image.data() : dxp + n * HW * g.C;
        std::fill(dxi, dxi + HW * g.C, T(0));
        for (int64_t pq0 = 0; pq0 < PQ; pq0 += kTileRows) {
          const int64_t rows = std::min(kTileRows, PQ - pq0);
          ColumnArgs<T> args{values.data_ptr<T>(), t_offsets.data_ptr<int32_t>(),
                             t_rows.data_ptr<int32_t>(), t_perm.data_ptr<int32_t>(), bm, bk,
                             dyi + pq0 * n_rows, n_rows, dcol.data(), width};
          for (const BlockColumns::Column& c : used.cols) kt.dds_columns(args, c.j, 0, rows);
          col2im_add(dcol.data(), rows, dxi, one, used, pq0, 0, g.C);
        }
        if (nchw) transpose(dxi, g.C, dxp + n * g.C * HW, HW, HW, g.C, false);
      }
  });
  return dx;
}

// ---- stride-1 "shifted image" path, feature-major, for blocks narrower than a vector -------
// Each channel is one row of a [channels, ld] buffer holding all N zero-padded images
// (Hp x Wp each) back to back, after `front` spare elements. For stride 1 the input of output
// position pos = n*Hp*Wp + p*Wp + q at tap (r, s) sits at pos + r*dh*Wp + s*dw, so every stored
// block reads whole shifted rows: the spmm/sdd micro-kernels run unchanged with per-block row
// offsets (SpmmArgs::d_off, SddArgs::a_off/b_off), vectorized along positions, with no im2col.
// Positions with q >= Q or p >= P are computed and dropped.
struct WideLayout {
  int64_t Hp, Wp, img, positions, span, front, ld;
  WideLayout(const ConvGeometry& g, int64_t tile) {
    Hp = g.H + 2 * g.ph;
    Wp = g.W + 2 * g.pw;
    img = Hp * Wp;
    positions = g.N * img;
    span = round_up(std::max<int64_t>(positions, 1), tile);  // positions the kernels compute
    const int64_t max_shift = (g.R - 1) * g.dh * Wp + (g.S - 1) * g.dw;
    front = round_up(max_shift, 16);
    ld = front + span + front;  // front margin: grad input reads back, x reads ahead
  }
  int64_t shift(const ConvGeometry& g, int64_t tap) const {
    return (tap / g.S) * g.dh * Wp + (tap % g.S) * g.dw;
  }
};

bool use_shifted_path(const ConvGeometry& g) { return g.sh == 1 && g.sw == 1; }

// Activations [N, rows_h, rows_w, C] (NHWC rows) or [N, C, rows_h, rows_w] (nchw) -> [C, ld]
// padded images (in = true), or back (in = false), cropping the rows [rows_h, rows_w] that start
// at (off_h, off_w) inside each padded image.
template <typename T>
void wide_transfer(T* wide, T* act, const WideLayout& L, int64_t N, int64_t rows_h,
                   int64_t rows_w, int64_t off_h, int64_t off_w, int64_t C, bool nchw, bool in) {
  at::parallel_for(0, N * rows_h, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / rows_h, h = i % rows_h;
      T* col = wide + L.front + n * L.img + (h + off_h) * L.Wp + off_w;
      for (int64_t c = 0; c < C; ++c, col += L.ld) {  // contiguous runs in the wide buffer
        if (nchw) {  // contiguous on both sides
          T* r = act + ((n * C + c) * rows_h + h) * rows_w;
          if (in)
            std::memcpy(col, r, rows_w * sizeof(T));
          else
            std::memcpy(r, col, rows_w * sizeof(T));
          continue;
        }
        T* r = act + (n * rows_h + h) * rows_w * C + c;  // one image row, [rows_w, C], in L1
        if (in)
          for (int64_t w = 0; w < rows_w; ++w) col[w] = r[w * C];
        else
          for (int64_t w = 0; w < rows_w; ++w) r[w * C] = col[w];
      }
    }
  });
}

// Runs the spmm kernel over segments x position tiles, tile-major so that a tile of shifted
// input rows stays in cache while every segment uses it.
template <typename T>
void spmm_positions(const KernelTable<T>& kt, const SpmmArgs<T>& args, int64_t n_seg,
                    const WideLayout& L) {
  const int64_t n_bt = L.span / kt.tile_b;
  parallel_dynamic(n_seg * n_bt, [&](int64_t i) {
    kt.spmm(args, i % n_seg, L.front + (i / n_seg) * kt.tile_b, kt.tile_b);
  });
}

template <typename T>
at::Tensor conv_forward_shifted(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& row_offsets, const at::Tensor& col_idx,
                                int64_t n_rows, const ConvGeometry& g, bool nchw) {
  const KernelTable<T> kt = select_kernels<T>();
  const WideLayout L(g, kt.tile_b);
  const int64_t nnz = values.size(0), bm = values.size(1), bk = values.size(2);
  const int64_t n_cb = g.C / bk;
  at::Tensor xw = at::zeros({g.C, L.ld}, x.options());
  wide_transfer<T>(xw.data_ptr<T>(), const_cast<T*>(x.data_ptr<T>()), L, g.N, g.H, g.W, g.ph,
                   g.pw, g.C, nchw, true);
  std::vector<int64_t> d_off(nnz);
  const int32_t* cols = col_idx.data_ptr<int32_t>();
  for (int64_t e = 0; e < nnz; ++e)
    d_off[e] = (cols[e] % n_cb) * bk * L.ld + L.shift(g, cols[e] / n_cb);
  at::Tensor yw = at::empty({n_rows, L.ld}, x.options());
  SpmmArgs<T> args{values.data_ptr<T>(), row_offsets.data_ptr<int32_t>(), cols, nullptr, bm,
                   bk, bk, 1, bm * bk, xw.data_ptr<T>(), yw.data_ptr<T>(), L.ld, d_off.data()};
  spmm_positions(kt, args, n_rows / bm, L);
  at::Tensor y = empty_activation(g.N, n_rows, g.P, g.Q, nchw, x.options());
  wide_transfer<T>(yw.data_ptr<T>(), y.data_ptr<T>(), L, g.N, g.P, g.Q, 0, 0, n_rows, nchw,
                   false);
  return y;
}

// dx: segments are input-channel blocks; each lists the blocks of its column at every tap,
// reading grad-output rows shifted back by the tap.
template <typename T>
at::Tensor conv_grad_input_shifted(const at::Tensor& dy, const at::Tensor& values,
                                   const at::Tensor& t_offsets, const at::Tensor& t_rows,
                                   const at::Tensor& t_perm, int64_t n_rows,
                                   const ConvGeometry& g, bool nchw) {
  const KernelTable<T> kt = select_kernels<T>();
  const WideLayout L(g, kt.tile_b);
  const int64_t nnz = values.size(0), bm = values.size(1), bk = values.size(2);
  const int64_t n_cb = g.C / bk, taps = g.R * g.S;
  at::Tensor dyw = at::zeros({n_rows, L.ld}, dy.options());
  wide_transfer<T>(dyw.data_ptr<T>(), const_cast<T*>(dy.data_ptr<T>()), L, g.N, g.P, g.Q, 0, 0,
                   n_rows, nchw, true);
  std::vector<int32_t> seg_offsets(n_cb + 1, 0), perm(nnz);
  std::vector<int64_t> d_off(nnz);
  const int32_t *toff = t_offsets.data_ptr<int32_t>(), *trow = t_rows.data_ptr<int32_t>(),
                *tperm = t_perm.data_ptr<int32_t>();
  int64_t k = 0;
  for (int64_t cb = 0; cb < n_cb; ++cb) {
    for (int64_t tap = 0; tap < taps; ++tap) {
      const int64_t col = tap * n_cb + cb;
      for (int64_t e = toff[col]; e < toff[col + 1]; ++e, ++k) {
        perm[k] = tperm[e];
        d_off[k] = trow[e] * bm * L.ld - L.shift(g, tap);
      }
    }
    seg_offsets[cb + 1] = (int32_t)k;
  }
  at::Tensor dxw = at::empty({g.C, L.ld}, dy.options());
  SpmmArgs<T> args{values.data_ptr<T>(), seg_offsets.data(), nullptr, perm.data(), bk, bm, 1,
                   bk, bm * bk, dyw.data_ptr<T>(), dxw.data_ptr<T>(), L.ld, d_off.data()};
  spmm_positions(kt, args, n_cb, L);
  at::Tensor dx = empty_activation(g.N, g.C, g.H, g.W, nchw, dy.options());
  wide_transfer<T>(dxw.data_ptr<T>(), dx.data_ptr<T>(), L, g.N, g.H, g.W, g.ph, g.pw, g.C, nchw,
                   false);
  return dx;
}

template <typename T>
at::Tensor conv_grad_values_shifted(const at::Tensor& dy, const at::Tensor& x,
                                    const at::Tensor& row_idx, const at::Tensor& col_idx,
                                    int64_t bm, int64_t bk, const ConvGeometry& g, bool nchw) {
  const KernelTable<T> kt = select_kernels<T>();
  const WideLayout L(g, kt.tile_b);
  const int64_t nnz = row_idx.numel(), n_rows = dy.size(1), n_cb = g.C / bk;
  at::Tensor dyw = at::zeros({n_rows, L.ld}, dy.options());
  wide_transfer<T>(dyw.data_ptr<T>(), const_cast<T*>(dy.data_ptr<T>()), L, g.N, g.P, g.Q, 0, 0,
                   n_rows, nchw, true);
  at::Tensor xw = at::zeros({g.C, L.ld}, x.options());
  wide_transfer<T>(xw.data_ptr<T>(), const_cast<T*>(x.data_ptr<T>()), L, g.N, g.H, g.W, g.ph,
                   g.pw, g.C, nchw, true);
  std::vector<int64_t> a_off(nnz), b_off(nnz);
  const int32_t *rows = row_idx.data_ptr<int32_t>(), *cols = col_idx.data_ptr<int32_t>();
  for (int64_t p = 0; p < nnz; ++p) {
    a_off[p] = rows[p] * bm * L.ld + L.front;
    b_off[p] = (cols[p] % n_cb) * bk * L.ld + L.front + L.shift(g, cols[p] / n_cb);
  }
  // Position tiles outermost: the rows of one tile (~4 KB each) stay in L2 while every stored
  // block reads them, where one whole-length dot per block streamed its two rows (the whole
  // batch of maps) from memory once per block. Each thread accumulates into its own slot.
  const int64_t tile = std::max<int64_t>(1, 1024 / kt.vec_len) * kt.vec_len;
  const int64_t n_tiles = (L.span + tile - 1) / tile, per_block = bm * bk;
  const int64_t block_chunk = std::max<int64_t>(1, 65536 / (tile * per_block));
  const int64_t n_chunks = (nnz + block_chunk - 1) / block_chunk;
  at::Tensor slots = at::zeros({std::max(1, at::get_num_threads()), nnz, bm, bk}, dy.options());
  std::atomic<int64_t> next_slot{0};
  parallel_chunks(n_tiles * n_chunks, 1, [&](const auto& claim) {
    T* slot = slots.data_ptr<T>() + next_slot++ * nnz * per_block;
    SddArgs<T> args{nullptr, nullptr, rows, cols, bm, bk, slot, L.ld};
    args.a_off = a_off.data();
    args.b_off = b_off.data();
    args.accumulate = true;
    for (int64_t i0, i1; claim(i0, i1);) {
      const int64_t t0 = i0 / n_chunks * tile, p0 = i0 % n_chunks * block_chunk;
      args.A = dyw.data_ptr<T>() + t0;
      args.B = xw.data_ptr<T>() + t0;
      args.length = std::min(tile, L.span - t0);
      for (int64_t p = p0; p < std::min(nnz, p0 + block_chunk); ++p) kt.sdd(args, p);
    }
  });
  return next_slot.load() == 1 ? slots[0] : slots.sum(0);
}

// NCHW [N, C, h, w] <-> NHWC rows [N*h*w, C], for the generic path (ATen's channels_last
// conversion is much faster than a generic permute copy).
at::Tensor nchw_to_rows(const at::Tensor& a) {
  return a.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({-1, a.size(1)});
}
at::Tensor rows_to_nchw(const at::Tensor& rows, int64_t N, int64_t h, int64_t w) {
  // clone, not contiguous(): a permutation that is already dense (1 channel, 1x1 maps, empty)
  // would come back as a view of the temporary, which callers may not modify in place
  return rows.reshape({N, h, w, rows.size(1)}).permute({0, 3, 1, 2}).clone(
      at::MemoryFormat::Contiguous);
}

}  // namespace

at::Tensor dds_conv_cpu(const at::Tensor& a, const at::Tensor& values,
                        const at::Tensor& row_offsets, const at::Tensor& col_idx,
                        const at::Tensor& t_offsets, const at::Tensor& t_rows,
                        const at::Tensor& t_perm, int64_t n_rows, int64_t n_cols, bool trans_w,
                        const ConvGeometry& g, const at::Tensor& bias, bool relu,
                        const at::Tensor& relu_mask) {
  const bool nchw = a.dim() == 4;
  at::Tensor ac = a.contiguous();
  const at::Tensor v = values.contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparsekern_dds_conv_cpu", [&] {
    const int64_t vec_len = select_kernels<scalar_t>().vec_len;
    const bool direct_grad_input = !trans_w && v.size(2) % vec_len == 0 && g.sh == 1 &&
                                   g.sw == 1;
    if (trans_w && v.size(1) % vec_len == 0) {
      out = conv_forward_direct<scalar_t>(ac, v, row_offsets, col_idx, n_rows, g, nchw,
                                         bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                                         relu);
      return;
    }
    if (direct_grad_input && relu_mask.defined()) {  // the mask folded into the copy
      const at::Tensor m = relu_mask.contiguous();
      out = conv_grad_input_direct<scalar_t>(ac, v, t_offsets, t_rows, t_perm, n_rows, g, nchw,
                                             m.data_ptr<scalar_t>());
      return;
    }
    if (relu_mask.defined())  // other paths: ReLU's backward as a pass of its own
      ac = at::threshold_backward(ac, relu_mask, 0).contiguous();
    if (direct_grad_input) {  // gather form
      out = conv_grad_input_direct<scalar_t>(ac, v, t_offsets, t_rows, t_perm, n_rows, g, nchw,
                                             nullptr);
    } else if (!trans_w && v.size(2) % vec_len == 0) {
      out = conv_grad_input_tiles<scalar_t>(ac, v, t_offsets, t_rows, t_perm, n_rows, g, nchw);
    } else if (trans_w && use_shifted_path(g)) {
      out = conv_forward_shifted<scalar_t>(ac, v, row_offsets, col_idx, n_rows, g, nchw);
    } else if (!trans_w && use_shifted_path(g)) {
      out = conv_grad_input_shifted<scalar_t>(ac, v, t_offsets, t_rows, t_perm, n_rows, g, nchw);
    } else if (nchw) {  // generic path: on NHWC rows
      out = dds_conv_cpu(nchw_to_rows(ac), v, row_offsets, col_idx, t_offsets, t_rows, t_perm,
                         n_rows, n_cols, trans_w, g, bias, relu, at::Tensor());
      out = trans_w ? rows_to_nchw(out, g.N, g.P, g.Q) : rows_to_nchw(out, g.N, g.H, g.W);
      return;  // (the bias and ReLU, if any, were applied on the rows)
    } else if (trans_w) {
      const int64_t chunk = chunk_rows(g), out_rows = g.out_rows();
      out = at::empty({out_rows, n_rows}, a.options());
      for (int64_t o0 = 0; o0 < out_rows; o0 += chunk) {
        const int64_t rows = std::min(chunk, out_rows - o0);
        const at::Tensor tile = pack_tile<scalar_t>(ac, g, o0, rows);
        out.narrow(0, o0, rows).copy_(dds_linear_cpu(tile, v, row_offsets, col_idx, t_offsets,
                                                     t_rows, t_perm, n_rows, n_cols, true));
      }
    } else {
      const int64_t chunk = chunk_rows(g), out_rows = g.out_rows();
      const BlockColumns taps = BlockColumns::all_taps(g);
      out = at::zeros({g.in_rows(), g.C}, a.options());
      for (int64_t o0 = 0; o0 < out_rows; o0 += chunk) {
        const int64_t rows = std::min(chunk, out_rows - o0);
        const at::Tensor dcol = dds_linear_cpu(ac.narrow(0, o0, rows), v, row_offsets, col_idx,
                                               t_offsets, t_rows, t_perm, n_rows, n_cols, false);
        at::parallel_for(0, g.C, 16, [&](int64_t c0, int64_t c1) {
          col2im_add(dcol.data_ptr<scalar_t>(), rows, out.data_ptr<scalar_t>(), g, taps, o0, c0,
                     c1);
        });
      }
    }
    if (bias.defined())  // the shifted and chunked forward paths: in place, no second tensor
      out.add_(nchw ? bias.view({1, -1, 1, 1}) : bias);
    if (relu) out.relu_();
  });
  return out;
}

at::Tensor sdd_conv_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_idx,
                        const at::Tensor& col_idx, int64_t bm, int64_t bk, const ConvGeometry& g) {
  const bool nchw = a.dim() == 4;
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparsekern_sdd_conv_cpu", [&] {
    if (bk % select_kernels<scalar_t>().vec_len == 0) {
      out = conv_grad_values_direct<scalar_t>(ac, bc, row_idx, col_idx, bm, bk, g, nchw);
    } else if (use_shifted_path(g)) {
      out = conv_grad_values_shifted<scalar_t>(ac, bc, row_idx, col_idx, bm, bk, g, nchw);
    } else if (nchw) {  // generic path: on NHWC rows
      out = sdd_conv_cpu(nchw_to_rows(ac), nchw_to_rows(bc), row_idx, col_idx, bm, bk, g);
    } else {
      const int64_t chunk = chunk_rows(g), out_rows = g.out_rows();
      out = at::zeros({row_idx.numel(), bm, bk}, a.options());
      for (int64_t o0 = 0; o0 < out_rows; o0 += chunk) {
        const int64_t rows = std::min(chunk, out_rows - o0);
        const at::Tensor tile = pack_tile<scalar_t>(bc, g, o0, rows);
        out.add_(sdd_linear_cpu(ac.narrow(0, o0, rows), tile, row_idx, col_idx, bm, bk));
      }
    }
  });
  return out;
}

}  // namespace sparsekern
