// Micro-kernel bodies. Included by exactly one translation unit per ISA, after
// `#pragma GCC target(...)`, inside `namespace SK_ISA`. VEC_BYTES is the vector width in bytes.
//
// spmm register tile: RM output rows x NV vectors of batch, accumulated over every stored block of
// the segment and every t, stored once. One scalar broadcast per row feeds NV FMAs and one vector
// load feeds RM FMAs, so with RM = NV = 4 the loop issues 8 loads per 16 FMAs (FMA-bound).
//
// sdd register tile: RM x RK dot products over the batch, reduced across lanes at the end.

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(VEC_BYTES)));
  static constexpr int64_t len = VEC_BYTES / sizeof(T);
  static inline type load(const T* p) {
    type v;
    __builtin_memcpy(&v, p, sizeof(v));
    return v;
  }
  static inline void store(T* p, type v) { __builtin_memcpy(p, &v, sizeof(v)); }
  static inline type zero() { return type{} ; }
  static inline T sum(type v) {
    T s = 0;
    for (int64_t i = 0; i < len; ++i) s += v[i];
    return s;
  }
};

// Calls fn(c, c_end, first) over [e0, e1) in chunks of `chunk` entries, at least once (an empty
// range still gets one call, so its output is written as zeros). The spmm and column kernels take
// a segment's blocks in chunks that stay in L1 while every register tile reuses them; the output
// tile carries the partial sums between chunks (first: start from zero).
template <typename F>
static inline void for_each_chunk(int64_t e0, int64_t e1, int64_t chunk, const F& fn) {
  int64_t c = e0;
  do {
    const int64_t c_end = e1 - c > chunk ? c + chunk : e1;
    fn(c, c_end, c == e0);
    c = c_end;
  } while (c < e1);
}

template <typename T, int RM, int NV>
static inline void spmm_tile(const SpmmArgs<T>& a, int64_t e_begin, int64_t e_end, bool first,
                             int64_t seg, int64_t r0, int64_t b0) {
  using V = Vec<T>;
  const int64_t ldb = a.ldb, t_len = a.t_len, sr = a.sr, st = a.st;
  T* o = a.O + (seg * a.out_rows + r0) * ldb + b0;
  typename V::type acc[RM][NV];
  for (int r = 0; r < RM; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = first ? V::zero() : V::load(o + r * ldb + v * V::len);
  for (int64_t e = e_begin; e < e_end; ++e) {
    const int64_t blk = a.perm ? a.perm[e] : e;
    const T* s = a.S + blk * a.blk_elems + r0 * sr;
    const T* d = a.D + (a.d_off ? a.d_off[e] : (int64_t)a.others[e] * t_len * ldb) + b0;
    for (int64_t t = 0; t < t_len; ++t) {
      typename V::type dv[NV];
      for (int v = 0; v < NV; ++v) dv[v] = V::load(d + t * ldb + v * V::len);
      for (int r = 0; r < RM; ++r) {
        const T w = s[r * sr + t * st];
        for (int v = 0; v < NV; ++v) acc[r][v] += w * dv[v];
      }
    }
  }
  for (int r = 0; r < RM; ++r)
    for (int v = 0; v < NV; ++v) V::store(o + r * ldb + v * V::len, acc[r][v]);
}

// All output rows of a segment for NV vectors of batch, block chunks sized so their dense rows
// (chunk * t_len rows of NV vectors) stay in L1.
template <typename T, int NV>
static void spmm_rows(const SpmmArgs<T>& a, int64_t seg, int64_t b0) {
  constexpr int64_t kL1Bytes = 24 * 1024;
  const int64_t per_block = a.t_len * NV * VEC_BYTES;
  const int64_t chunk = per_block >= kL1Bytes ? 1 : kL1Bytes / per_block;
  for_each_chunk(a.offsets[seg], a.offsets[seg + 1], chunk, [&](int64_t c, int64_t c_end,
                                                                 bool first) {
    int64_t r = 0;
    for (; r + 4 <= a.out_rows; r += 4) spmm_tile<T, 4, NV>(a, c, c_end, first, seg, r, b0);
    switch (a.out_rows - r) {
      case 3: spmm_tile<T, 3, NV>(a, c, c_end, first, seg, r, b0); break;
      case 2: spmm_tile<T, 2, NV>(a, c, c_end, first, seg, r, b0); break;
      case 1: spmm_tile<T, 1, NV>(a, c, c_end, first, seg, r, b0); break;
      default: break;
    }
  });
}

template <typename T>
static void spmm(const SpmmArgs<T>& a, int64_t seg, int64_t b0, int64_t nb) {
  constexpr int64_t L = Vec<T>::len;
  int64_t b = b0;
  const int64_t b_end = b0 + nb;
  if (a.out_rows < 4) {  // 1-3 rows (e.g. (1,1) blocks): widen the tile to 8 vectors so enough
    for (; b + 8 * L <= b_end; b += 8 * L) {  // independent accumulators hide FMA latency
      switch (a.out_rows) {
        case 3: spmm_tile<T, 3, 8>(a, a.offsets[seg], a.offsets[seg + 1], true, seg, 0, b); break;
        case 2: spmm_tile<T, 2, 8>(a, a.offsets[seg], a.offsets[seg + 1], true, seg, 0, b); break;
        default: spmm_tile<T, 1, 8>(a, a.offsets[seg], a.offsets[seg + 1], true, seg, 0, b);
      }
    }
  }
  for (; b + 4 * L <= b_end; b += 4 * L) spmm_rows<T, 4>(a, seg, b);
  switch ((b_end - b) / L) {
    case 3: spmm_rows<T, 3>(a, seg, b); break;
    case 2: spmm_rows<T, 2>(a, seg, b); break;
    case 1: spmm_rows<T, 1>(a, seg, b); break;
    default: break;
  }
}

template <typename T, int RM, int RK>
static inline void sdd_tile(const SddArgs<T>& a, int64_t p, int64_t m0, int64_t k0) {
  using V = Vec<T>;
  // Fewer than 8 accumulators cannot hide FMA latency: split the batch into U partial sums.
  constexpr int U = (RM * RK >= 8) ? 1 : (RM * RK >= 4 ? 2 : 4);
  typename V::type acc[U][RM][RK];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < RM; ++i)
      for (int j = 0; j < RK; ++j) acc[u][i][j] = V::zero();
  const int64_t ldb = a.ldb;
  const T* arow = a.A + (a.a_off ? a.a_off[p] : (int64_t)a.row_idx[p] * a.bm * ldb) + m0 * ldb;
  const T* brow = a.B + (a.b_off ? a.b_off[p] : (int64_t)a.col_idx[p] * a.bk * ldb) + k0 * ldb;
  const int64_t n_vec = (a.length ? a.length : ldb) / V::len;
  int64_t c = 0;
  for (; c + U <= n_vec; c += U) {
    for (int u = 0; u < U; ++u) {
      const int64_t off = (c + u) * V::len;
      typename V::type av[RM], bv[RK];
      for (int i = 0; i < RM; ++i) av[i] = V::load(arow + i * ldb + off);
      for (int j = 0; j < RK; ++j) bv[j] = V::load(brow + j * ldb + off);
      for (int i = 0; i < RM; ++i)
        for (int j = 0; j < RK; ++j) acc[u][i][j] += av[i] * bv[j];
    }
  }
  for (; c < n_vec; ++c) {
    const int64_t off = c * V::len;
    for (int i = 0; i < RM; ++i)
      for (int j = 0; j < RK; ++j)
        acc[0][i][j] += V::load(arow + i * ldb + off) * V::load(brow + j * ldb + off);
  }
  T* out = a.out + p * a.bm * a.bk + m0 * a.bk + k0;
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RK; ++j) {
      typename V::type s = acc[0][i][j];
      for (int u = 1; u < U; ++u) s += acc[u][i][j];
      out[i * a.bk + j] = a.accumulate ? out[i * a.bk + j] + V::sum(s) : V::sum(s);
    }
}

template <typename T, int RM>
static inline void sdd_row_tile(const SddArgs<T>& a, int64_t p, int64_t m0) {
  int64_t k = 0;
  for (; k + 4 <= a.bk; k += 4) sdd_tile<T, RM, 4>(a, p, m0, k);
  switch (a.bk - k) {
    case 3: sdd_tile<T, RM, 3>(a, p, m0, k); break;
    case 2: sdd_tile<T, RM, 2>(a, p, m0, k); break;
    case 1: sdd_tile<T, RM, 1>(a, p, m0, k); break;
    default: break;
  }
}

template <typename T>
static void sdd(const SddArgs<T>& a, int64_t p) {
  int64_t m = 0;
  for (; m + 4 <= a.bm; m += 4) sdd_row_tile<T, 4>(a, p, m);
  switch (a.bm - m) {
    case 3: sdd_row_tile<T, 3>(a, p, m); break;
    case 2: sdd_row_tile<T, 2>(a, p, m); break;
    case 1: sdd_row_tile<T, 1>(a, p, m); break;
    default: break;
  }
}

// Batch-major sdd: RM rows x KV vectors of one block, accumulated over the batch. Per batch row
// KV vector loads and RM broadcasts feed RM*KV FMAs, and no lane reduction is needed.
// DIRECT: B's rows addressed through b_row / b_off (conv on a padded image).
template <typename T, int RM, int KV, bool DIRECT>
static inline void sdd_bm_tile(const SddArgs<T>& a, int64_t p, int64_t m0, int64_t k0) {
  using V = Vec<T>;
  typename V::type acc[RM][KV];
  for (int r = 0; r < RM; ++r)
    for (int v = 0; v < KV; ++v) acc[r][v] = V::zero();
  const T* arow = a.A + (int64_t)a.row_idx[p] * a.bm + m0;
  const T* brow = a.B + (DIRECT ? a.b_off[p] : (int64_t)a.col_idx[p] * a.bk) + k0;
  for (int64_t b = 0; b < a.batch; ++b) {
    const T* bb = brow + (DIRECT ? a.b_row[b] : b * a.ldb);
    typename V::type bv[KV];
    for (int v = 0; v < KV; ++v) bv[v] = V::load(bb + v * V::len);
    for (int r = 0; r < RM; ++r) {
      const T w = arow[b * a.lda + r];
      for (int v = 0; v < KV; ++v) acc[r][v] += w * bv[v];
    }
  }
  T* out = a.out + p * a.bm * a.bk + m0 * a.bk + k0;
  for (int r = 0; r < RM; ++r)
    for (int v = 0; v < KV; ++v) {
      T* o = out + r * a.bk + v * V::len;
      V::store(o, a.accumulate ? V::load(o) + acc[r][v] : acc[r][v]);
    }
}

template <typename T, int KV, bool DIRECT>
static inline void sdd_bm_cols(const SddArgs<T>& a, int64_t p, int64_t k0) {
  constexpr int RM = KV >= 4 ? 4 : 8;  // RM*KV accumulators: 8 to 16 of the 32 registers
  int64_t m = 0;
  for (; m + RM <= a.bm; m += RM) sdd_bm_tile<T, RM, KV, DIRECT>(a, p, m, k0);
  for (; m < a.bm; ++m) sdd_bm_tile<T, 1, KV, DIRECT>(a, p, m, k0);
}

template <typename T, bool DIRECT>
static void sdd_batch_major_impl(const SddArgs<T>& a, int64_t p) {
  constexpr int64_t L = Vec<T>::len;
  int64_t k = 0;
  for (; k + 4 * L <= a.bk; k += 4 * L) sdd_bm_cols<T, 4, DIRECT>(a, p, k);
  for (; k + 2 * L <= a.bk; k += 2 * L) sdd_bm_cols<T, 2, DIRECT>(a, p, k);
  for (; k + L <= a.bk; k += L) sdd_bm_cols<T, 1, DIRECT>(a, p, k);
}

template <typename T>
static void sdd_batch_major(const SddArgs<T>& a, int64_t p) {
  if (a.b_row)
    sdd_batch_major_impl<T, true>(a, p);
  else
    sdd_batch_major_impl<T, false>(a, p);
}

// Column tile: RB batch rows x KV vectors of block column j over blocks [e_begin, e_end). Per m,
// KV loads of the block row and RB broadcasts of the activation feed RB*KV FMAs. Partial sums
// live in the output between block chunks (first: start from zero). DIRECT: rows addressed
// through a_row / a_off (conv on a padded image) instead of b * lda + rows[e] * bm.
template <typename T, int RB, int KV, bool DIRECT>
static inline void columns_tile(const ColumnArgs<T>& a, int64_t e_begin, int64_t e_end,
                                bool first, int64_t j, int64_t b0, int64_t k0) {
  using V = Vec<T>;
  T* o = a.O + b0 * a.ldo + j * a.bk + k0;
  typename V::type acc[RB][KV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < KV; ++v)
      acc[r][v] = first ? V::zero() : V::load(o + r * a.ldo + v * V::len);
  const int64_t bm = a.bm, bk = a.bk, lda = a.lda;
  const auto row = [&](int64_t e, int r) {  // entry e's activations in tile row r
    return DIRECT ? a.A + a.a_row[b0 + r] + a.a_off[e]
                  : a.A + (b0 + r) * lda + (int64_t)a.rows[e] * bm;
  };
  for (int64_t e = e_begin; e < e_end; ++e) {
    const T* s = a.S + (a.perm ? (int64_t)a.perm[e] : e) * bm * bk + k0;
    if (e + 1 < e_end)  // the next block's activations jump elsewhere: fetch them early
      for (int r = 0; r < RB; ++r)
        for (int64_t m = 0; m < bm; m += 64 / sizeof(T)) __builtin_prefetch(row(e + 1, r) + m);
    if (DIRECT) {
      const T* arow[RB];
      for (int r = 0; r < RB; ++r) arow[r] = row(e, r);
      for (int64_t m = 0; m < bm; ++m) {
        typename V::type sv[KV];
        for (int v = 0; v < KV; ++v) sv[v] = V::load(s + m * bk + v * V::len);
        for (int r = 0; r < RB; ++r) {
          const T w = arow[r][m];
          for (int v = 0; v < KV; ++v) acc[r][v] += w * sv[v];
        }
      }
    } else {
      const T* arow = row(e, 0);
      for (int64_t m = 0; m < bm; ++m) {
        typename V::type sv[KV];
        for (int v = 0; v < KV; ++v) sv[v] = V::load(s + m * bk + v * V::len);
        for (int r = 0; r < RB; ++r) {
          const T w = arow[r * lda + m];
          for (int v = 0; v < KV; ++v) acc[r][v] += w * sv[v];
        }
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < KV; ++v) V::store(o + r * a.ldo + v * V::len, acc[r][v]);
}

// All batch rows of a block column, block chunks sized so the chunk's block rows stay in L1.
template <typename T, int KV, bool DIRECT>
static inline void columns_rows(const ColumnArgs<T>& a, int64_t j, int64_t b0, int64_t nb,
                                int64_t k0) {
  // RB*KV accumulators of the 32 (AVX-512) or 16 registers. With KV = 2 (32-wide float blocks)
  // and 32 registers, 12 rows (24 accumulators) amortize the block row's loads better than 8:
  // 14 loads per 24 FMAs instead of 10 per 16, ~15-20% faster on the Ice Lake host.
  constexpr int RB = KV >= 4 ? 4 : (KV == 2 && VEC_BYTES == 64 ? 12 : 8);
  constexpr int64_t kL1Bytes = 16 * 1024;
  const int64_t per_block = a.bm * KV * VEC_BYTES;
  const int64_t chunk = per_block >= kL1Bytes ? 1 : kL1Bytes / per_block;
  for_each_chunk(a.offsets[j], a.offsets[j + 1], chunk, [&](int64_t c, int64_t c_end,
                                                             bool first) {
    int64_t b = b0;
    for (; b + RB <= b0 + nb; b += RB)
      columns_tile<T, RB, KV, DIRECT>(a, c, c_end, first, j, b, k0);
    if (RB > 4)
      for (; b + 4 <= b0 + nb; b += 4)
        columns_tile<T, 4, KV, DIRECT>(a, c, c_end, first, j, b, k0);
    for (; b < b0 + nb; ++b) columns_tile<T, 1, KV, DIRECT>(a, c, c_end, first, j, b, k0);
  });
}

template <typename T, bool DIRECT>
static void dds_columns_impl(const ColumnArgs<T>& a, int64_t j, int64_t b0, int64_t nb) {
  constexpr int64_t L = Vec<T>::len;
  int64_t k = 0;
  for (; k + 4 * L <= a.bk; k += 4 * L) columns_rows<T, 4, DIRECT>(a, j, b0, nb, k);
  for (; k + 2 * L <= a.bk; k += 2 * L) columns_rows<T, 2, DIRECT>(a, j, b0, nb, k);
  for (; k + L <= a.bk; k += L) columns_rows<T, 1, DIRECT>(a, j, b0, nb, k);
}

template <typename T>
static void dds_columns(const ColumnArgs<T>& a, int64_t j, int64_t b0, int64_t nb) {
  if (a.a_row)
    dds_columns_impl<T, true>(a, j, b0, nb);
  else
    dds_columns_impl<T, false>(a, j, b0, nb);
}

// 8x8 transpose in registers: three rounds of two-vector shuffles (unpack pairs, pairs of
// pairs, halves), 8 loads and 8 stores for 64 elements. Vectors of 8 elements whatever the ISA
// (GCC splits or widens them as needed).
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define SK_HAVE_SHUFFLEVECTOR 1
#endif
#endif

#ifdef SK_HAVE_SHUFFLEVECTOR
template <typename T>
static inline void transpose8x8(const T* s, int64_t lds, T* d, int64_t ldd) {
  typedef T v8 __attribute__((vector_size(8 * sizeof(T))));
  v8 r[8], a[8], b[8];
  for (int i = 0; i < 8; ++i) __builtin_memcpy(&r[i], s + i * lds, sizeof(v8));
  for (int i = 0; i < 8; i += 2) {
    a[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    a[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int k = 0; k < 2; ++k) {
      b[i + 2 * k] = __builtin_shufflevector(a[i + k], a[i + k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      b[i + 2 * k + 1] = __builtin_shufflevector(a[i + k], a[i + k + 2], 2, 3, 10, 11, 6, 7, 14,
                                                 15);
    }
  for (int k = 0; k < 4; ++k) {
    const v8 lo = __builtin_shufflevector(b[k], b[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    const v8 hi = __builtin_shufflevector(b[k], b[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    __builtin_memcpy(d + k * ldd, &lo, sizeof(v8));
    __builtin_memcpy(d + (k + 4) * ldd, &hi, sizeof(v8));
  }
}
#endif

// dst[j * ldd + i] = src[i * lds + j]. The side that lives in memory is walked row by row
// (8 rows at a time, front to back, so the prefetchers see 8 sequential streams); the other
// side is expected in cache. src_in_memory: source rows outermost, else destination rows.
template <typename T>
static void transpose(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows,
                      int64_t cols, bool src_in_memory) {
#ifdef SK_HAVE_SHUFFLEVECTOR
  const int64_t rows8 = rows / 8 * 8, cols8 = cols / 8 * 8;
  if (src_in_memory) {
    for (int64_t i0 = 0; i0 < rows8; i0 += 8)
      for (int64_t j0 = 0; j0 < cols8; j0 += 8)
        transpose8x8(src + i0 * lds + j0, lds, dst + j0 * ldd + i0, ldd);
  } else {
    for (int64_t j0 = 0; j0 < cols8; j0 += 8)
      for (int64_t i0 = 0; i0 < rows8; i0 += 8)
        transpose8x8(src + i0 * lds + j0, lds, dst + j0 * ldd + i0, ldd);
  }
#else
  const int64_t rows8 = 0, cols8 = 0;
  (void)src_in_memory;
#endif
  for (int64_t j = 0; j < cols; ++j)  // the edges
    for (int64_t i = j < cols8 ? rows8 : 0; i < rows; ++i) dst[j * ldd + i] = src[i * lds + j];
}

// dst[i] += src[i], i < n.
template <typename T>
static void add(T* dst, const T* src, int64_t n) {
  using V = Vec<T>;
  int64_t i = 0;
  for (; i + V::len <= n; i += V::len) V::store(dst + i, V::load(dst + i) + V::load(src + i));
  for (; i < n; ++i) dst[i] += src[i];
}

// p[i] = max(p[i], 0), i < n; NaN stays NaN, as torch.relu.
template <typename T>
static void relu(T* p, int64_t n) {
  using V = Vec<T>;
  const typename V::type zero = V::zero();
  int64_t i = 0;
  for (; i + V::len <= n; i += V::len) {
    const typename V::type v = V::load(p + i);
    V::store(p + i, v < zero ? zero : v);
  }
  for (; i < n; ++i) p[i] = p[i] < T(0) ? T(0) : p[i];
}

// dst[i] = mask[i] > 0 ? src[i] : 0, i < n: ReLU's backward (threshold on its output).
template <typename T>
static void masked_copy(T* dst, const T* src, const T* mask, int64_t n) {
  using V = Vec<T>;
  const typename V::type zero = V::zero();
  int64_t i = 0;
  for (; i + V::len <= n; i += V::len)
    V::store(dst + i, V::load(mask + i) > zero ? V::load(src + i) : zero);
  for (; i < n; ++i) dst[i] = mask[i] > T(0) ? src[i] : T(0);
}

template <typename T>
static KernelTable<T> table(const char* isa) {
  return KernelTable<T>{isa, Vec<T>::len, 8 * Vec<T>::len, &spmm<T>, &sdd<T>,
                        &sdd_batch_major<T>, &dds_columns<T>, &transpose<T>, &add<T>,
                        &relu<T>, &masked_copy<T>};
}
