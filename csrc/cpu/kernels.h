// Block-sparse micro-kernels, written once over GCC vector extensions and compiled once per ISA
// (kernels_avx512.cpp, kernels_avx2.cpp, kernels_base.cpp). No torch headers here: the ISA
// translation units must not emit torch inline functions compiled for a wider ISA.
//
// All kernels work "feature-major": activations are transposed to [features, Bp] with the batch
// padded with zeros to a multiple of the vector width, so every kernel vectorizes along the batch,
// which is wide for any block shape, (1,1) included.
#pragma once
#include <cstdint>

namespace sparsekern {

// One sparse x dense product, walked segment by segment (a segment is a block row for y = x W^T,
// a block column for dx = dy W):
//   O[s*out_rows + r, b] = sum_{e in seg s} sum_t S[blk(e)][r*sr + t*st] * D[(other(e)*t_len + t), b]
template <typename T>
struct SpmmArgs {
  const T* S;               // block values [nnz, bm, bk]
  const int32_t* offsets;   // [n_seg + 1] entries of each segment
  const int32_t* others;    // [nnz] block index along the reduced axis for each entry
  const int32_t* perm;      // [nnz] value block of each entry, or nullptr for identity
  int64_t out_rows, t_len, sr, st, blk_elems;
  const T* D;               // [*, ldb] feature-major dense operand
  T* O;                     // [n_seg*out_rows, ldb] feature-major output
  int64_t ldb;              // padded batch (multiple of tile_b_min)
  // Optional [nnz] offsets into D of each entry's first dense row (default others*t_len*ldb):
  // the conv path points them at shifted rows of a padded image buffer.
  const int64_t* d_off = nullptr;
};

// dx = dy W on batch-major operands (no activation transposes), walking block column j. With
// the blocks transposed (S = W^T's blocks, CSR over block rows) the same kernel computes x W^T.
//   O[b, j*bk + k] = sum_{e in col j} sum_m A[b, rows(e)*bm + m] * S[perm(e)][m][k]
// Needs bk % vec_len == 0 (vectors along the block's columns).
template <typename T>
struct ColumnArgs {
  const T* S;               // block values [nnz, bm, bk]
  const int32_t* offsets;   // t_offsets [n_bcols + 1]
  const int32_t* rows;      // t_rows [nnz]
  const int32_t* perm;      // t_perm [nnz], or nullptr for identity
  int64_t bm, bk;
  const T* A;               // [batch, lda]
  int64_t lda;
  T* O;                     // [batch, ldo]
  int64_t ldo;
  // Optional direct conv addressing (no im2col copy): batch row b of A starts at A + a_row[b]
  // (instead of A + b * lda) and entry e's block at + a_off[e] (instead of rows[e] * bm). Both
  // or neither; rows is then unused.
  const int64_t* a_row = nullptr;  // [nb] from b0: offsets of each row (an output pixel)
  const int64_t* a_off = nullptr;  // [nnz] offset of each entry's block (a filter tap, channels)
};

// Sampled dense x dense: out[p][m][k] = sum_b A[row(p)*bm + m, b] * B[col(p)*bk + k, b]
// (feature-major operands). The batch-major variant reads A[b, row(p)*bm + m] and
// B[b, col(p)*bk + k] directly (no transposes) and needs bk % vec_len == 0.
template <typename T>
struct SddArgs {
  const T* A;               // feature-major [Mp, ldb] | batch-major [batch, lda]
  const T* B;               // feature-major [Kp, ldb] | batch-major [batch, ldb]
  const int32_t* row_idx;
  const int32_t* col_idx;
  int64_t bm, bk;
  T* out;                   // [nnz, bm, bk]
  int64_t ldb;              // feature-major: padded batch | batch-major: row stride of B
  int64_t lda = 0;          // batch-major: row stride of A
  int64_t batch = 0;        // batch-major: rows of A and B
  bool accumulate = false;  // out += instead of out =
  // Feature-major only: optional [nnz] offsets of each block's first A / B row (default
  // row*bm*ldb, col*bk*ldb) and the dot length (default ldb), for the conv path's shifted rows.
  const int64_t* a_off = nullptr;
  const int64_t* b_off = nullptr;
  int64_t length = 0;
  // Batch-major only: optional direct conv addressing of B (no im2col copy): batch row b starts
  // at B + b_row[b] and block p's columns at + b_off[p] (instead of b * ldb + col(p) * bk).
  const int64_t* b_row = nullptr;  // [batch]
};

template <typename T>
struct KernelTable {
  const char* isa;
  int64_t vec_len;   // elements per vector: the batch padding unit
  int64_t tile_b;    // elements of batch one spmm call covers when the batch allows it
  // Computes segment `seg`, batch columns [b0, b0 + nb) (nb a multiple of vec_len, <= tile_b).
  void (*spmm)(const SpmmArgs<T>&, int64_t seg, int64_t b0, int64_t nb);
  // Computes stored block p.
  void (*sdd)(const SddArgs<T>&, int64_t p);
  // Same on batch-major operands; only for bk % vec_len == 0.
  void (*sdd_batch_major)(const SddArgs<T>&, int64_t p);
  // Block column j, batch rows [b0, b0 + nb); only for bk % vec_len == 0.
  void (*dds_columns)(const ColumnArgs<T>&, int64_t j, int64_t b0, int64_t nb);
  // dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols (NCHW <-> NHWC pieces); the
  // loop order streams the source (src_in_memory) or the destination.
  void (*transpose)(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows, int64_t cols,
                    bool src_in_memory);
  // dst[i] += src[i] for i < n (col2im scatter-adds, bias rows).
  void (*add)(T* dst, const T* src, int64_t n);
  // p[i] = max(p[i], 0) for i < n (a fused ReLU on an output tile in cache; NaN stays NaN).
  void (*relu)(T* p, int64_t n);
  // dst[i] = mask[i] > 0 ? src[i] : 0 for i < n (ReLU's backward folded into a copy of dy).
  void (*masked_copy)(T* dst, const T* src, const T* mask, int64_t n);
};

KernelTable<float> kernels_f32_avx512();
KernelTable<double> kernels_f64_avx512();
KernelTable<float> kernels_f32_avx2();
KernelTable<double> kernels_f64_avx2();
KernelTable<float> kernels_f32_base();
KernelTable<double> kernels_f64_base();

}  // namespace sparsekern
