"""Triton kernels for the three products, each written once for Linear and Conv2d.

Linear is the conv with a 1x1 "image": N = batch, H = W = P = Q = 1, R = S = 1, C = n_cols, so
each kernel carries the implicit-GEMM indexing under the constexpr IS_CONV and the linear
instance compiles without it. Shapes (see sparsekern/ops.py):

    dds_nt  y [N*P*Q, Mp] = im2col(x) @ W^T   one program: TILES x BLOCK_R output rows x one
                                              block row (K_STEP: several blocks a step)
    dds_nn  dx [N*H*W, C] = col2im(dy @ W)    one program: BLOCK_R input rows x one block column
                                              of one filter tap (gathers dy, no atomics)
    sdd     dW [nnz, BM, BK] = dy^T @ im2col(x) on the stored blocks; one program per block
                                              (or GROUP blocks of a block row) and row split;
                                              with several splits, fp32 partials summed by the
                                              launcher

W's blocks are values [nnz, BM, BK] in CSR order; t_offsets/t_rows/t_perm walk block columns.
Accumulation is float32 (float64 for float64 operands).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _conv_row_coords(rows, n_out, P, Q, H, sh, sw, ph, pw, IS_CONV: tl.constexpr):
    """Output pixel rows (n, p, q) -> (n*H, the input row and column that tap (0, 0) reads,
    valid): the divisions, done once per tile where the rows stay (a runtime integer division
    costs ~20 instructions per element)."""
    ok = rows < n_out
    nh = rows  # linear: the row itself
    h0 = rows
    w0 = rows
    if IS_CONV:  # (one return: the compiler checks every return's type, even a dead one's)
        n = rows // (P * Q)
        pq = rows % (P * Q)
        nh = n * H
        h0 = (pq // Q) * sh - ph
        w0 = (pq % Q) * sw - pw
    return nh, h0, w0, ok


@triton.jit
def _conv_tap_rows(nh, h0, w0, ok, r, s, H, W, dh, dw, IS_CONV: tl.constexpr):
    """The input rows (n, h, w) that filter tap (r, s) reads for _conv_row_coords' rows, and
    validity (zero padding by mask)."""
    src = nh
    if IS_CONV:
        h = h0 + r * dh
        w = w0 + s * dw
        ok = ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        src = (nh + h) * W + w
    return src.to(tl.int64), ok


@triton.jit
def _conv_source_rows(rows, n_out, P, Q, H, W, r, s, sh, sw, ph, pw, dh, dw,
                      IS_CONV: tl.constexpr):
    """Output pixel rows (n, p, q) -> the input rows (n, h, w) tap (r, s) reads, and validity."""
    nh, h0, w0, ok = _conv_row_coords(rows, n_out, P, Q, H, sh, sw, ph, pw, IS_CONV)
    return _conv_tap_rows(nh, h0, w0, ok, r, s, H, W, dh, dw, IS_CONV)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the interpreter gets low-precision dots wrong: compute them in float32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee",
                      out_dtype=acc.dtype)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _program_tile(n_tiles, LINE_MAJOR: tl.constexpr):
    """This program's (row tile, line of W) on the 1D grid of n_tiles x lines programs.
    LINE_MAJOR: a row tile's lines (block rows for dds_nt, block columns for dds_nn) run one
    after the other, so the programs in flight share a few row tiles of the operand that is
    re-read once per stored block, which stays in L2; W's blocks, re-read once per row tile,
    stay there too while W is small. Otherwise (W too large to stay in L2) the row tiles of a
    line run together, so each of W's blocks is read from memory about once."""
    pid = tl.program_id(0)
    if LINE_MAJOR:
        n_lines = tl.num_programs(0) // n_tiles
        tile = pid // n_lines
        line = pid % n_lines
    else:
        tile = pid % n_tiles
        line = pid // n_tiles
    return tile, line


@triton.jit(do_not_specialize=["nnz_log2"])
def dds_nt_kernel(a_ptr, values_ptr, row_offsets_ptr, col_idx_ptr, out_ptr, bias_ptr,
                  n_out, stride_a, stride_out,
                  H, W, C, S, P, Q, sh, sw, ph, pw, dh, dw, nnz_log2,
                  BM: tl.constexpr, BK: tl.constexpr, BLOCK_R: tl.constexpr,
                  TILES: tl.constexpr, SWAP: tl.constexpr, LINE_MAJOR: tl.constexpr,
                  IS_CONV: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                  K_STEP: tl.constexpr = 0):
    """One program: TILES consecutive tiles of BLOCK_R output rows x block row i of W.
    TILES > 1 runs one flat loop over (tile, stored block) pairs, so the software pipeline
    carries on from one tile into the next instead of filling again for every ~nnz/row blocks.
    SWAP accumulates the transposed tile, W_blk @ x^T ([BM, BLOCK_R]): the MMA's N dimension is
    then the rows, not the block height (wider MMA instructions for 32/64-row blocks).
    K_STEP > BK (TILES = 1): each step takes K_STEP // BK consecutive blocks of the row, their x
    columns gathered side by side, one MMA K_STEP deep: narrow blocks (16, 32) in half or a
    quarter of the steps, each moving more bytes (for conv the taps differ per block, so the
    source rows per column, as in sdd's GROUP: correct, left out of autotuning).
    nnz_log2 (stored blocks per block row, log2) is only read by the autotuner's key."""
    KG: tl.constexpr = K_STEP // BK if K_STEP > BK else 1  # blocks per step
    # i: block row of W = block of output features
    pid_r, i = _program_tile(tl.cdiv(n_out, TILES * BLOCK_R), LINE_MAJOR)
    offs_m = tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    first = pid_r * (TILES * BLOCK_R)  # first output row of this program
    start = tl.load(row_offsets_ptr + i)
    nblk = tl.load(row_offsets_ptr + i + 1) - start
    if SWAP:
        acc = tl.zeros((BM, BLOCK_R), dtype=ACC_DTYPE)
    else:
        acc = tl.zeros((BLOCK_R, BM), dtype=ACC_DTYPE)
    if TILES == 1:
        n_iter = nblk
        per_tile = nblk
    else:  # an empty block row still takes one (masked) step per tile, to store its epilogue
        per_tile = tl.maximum(nblk, 1)
        n_iter = tl.minimum(TILES, tl.cdiv(n_out - first, BLOCK_R)) * per_tile
    if TILES == 1:  # one tile: its rows' pixel coordinates serve every block
        nh1, h01, w01, ok1 = _conv_row_coords(first + tl.arange(0, BLOCK_R), n_out, P, Q, H, sh,
                                              sw, ph, pw, IS_CONV)
    # K_STEP's loop is its own: the one-block loop below keeps the code the H100 measured
    if KG > 1:
        tl.static_assert(TILES == 1, "K_STEP > BK takes one row tile per program")
        offs_g = tl.arange(0, KG * BK)  # the step's columns, block after block
        for it in range(tl.cdiv(nblk, KG)):
            q = start + it * KG + offs_g // BK  # stored block of each column
            has_g = q < start + nblk
            col0 = tl.load(col_idx_ptr + q, mask=has_g, other=0) * BK
            tap = col0 // C
            src, ok = _conv_tap_rows(nh1[:, None], h01[:, None], w01[:, None], ok1[:, None],
                                     (tap // S)[None, :], (tap % S)[None, :], H, W, dh, dw,
                                     IS_CONV)
            kc = col0
            if IS_CONV:
                kc = col0 % C
            kcol = tl.max_contiguous(tl.multiple_of(kc + offs_g % BK, BK), BK)
            x = tl.load(a_ptr + src * stride_a + kcol[None, :], mask=ok & has_g[None, :],
                        other=0.0)
            w = tl.load(values_ptr + q.to(tl.int64)[None, :] * (BM * BK) + offs_m[:, None] * BK
                        + (offs_g % BK)[None, :], mask=has_g[None, :], other=0.0)
            if SWAP:
                acc = _dot(w, tl.trans(x), acc, PRECISION, UPCAST)
            else:
                acc = _dot(x, tl.trans(w), acc, PRECISION, UPCAST)
    else:
        for it in range(n_iter):
            t = it // per_tile
            p = start + it - t * per_tile  # stored block (CSR position)
            has = p < start + nblk
            rows = first + t * BLOCK_R + tl.arange(0, BLOCK_R)
            col0 = tl.load(col_idx_ptr + p, mask=has, other=0) * BK  # in [0, R*S*C): int32 math
            tap = col0 // C
            if TILES == 1:
                src, ok = _conv_tap_rows(nh1, h01, w01, ok1, tap // S, tap % S, H, W, dh, dw,
                                         IS_CONV)
            else:
                src, ok = _conv_source_rows(rows, n_out, P, Q, H, W, tap // S, tap % S, sh, sw, ph,
                                            pw, dh, dw, IS_CONV)
            # the hint: the compiler cannot see that a loaded col0 % C is a multiple of BK, and
            # without it the x tile is loaded 2 bytes at a time and outside the async pipeline
            kc = col0
            if IS_CONV:  # the channel offset within the tap (linear: col0 < C already)
                kc = col0 % C
            kcol = tl.max_contiguous(tl.multiple_of(kc + offs_k, BK), BK)
            x = tl.load(a_ptr + src.to(tl.int64)[:, None] * stride_a + kcol[None, :],
                        mask=(ok & has)[:, None], other=0.0)
            w = tl.load(values_ptr + p.to(tl.int64) * (BM * BK) + offs_m[:, None] * BK
                        + offs_k[None, :], mask=has, other=0.0)
            if SWAP:
                acc = _dot(w, tl.trans(x), acc, PRECISION, UPCAST)
            else:
                acc = _dot(x, tl.trans(w), acc, PRECISION, UPCAST)
            if TILES > 1:
                if it - t * per_tile == per_tile - 1:  # last block of this tile
                    _nt_epilogue(acc, out_ptr, bias_ptr, rows, n_out, stride_out, i, offs_m, BM,
                                 ACC_DTYPE, HAS_BIAS, RELU, SWAP)
                    acc = tl.zeros_like(acc)
    if TILES == 1:
        _nt_epilogue(acc, out_ptr, bias_ptr, first + tl.arange(0, BLOCK_R), n_out, stride_out, i,
                     offs_m, BM, ACC_DTYPE, HAS_BIAS, RELU, SWAP)


@triton.jit
def _nt_epilogue(acc, out_ptr, bias_ptr, rows, n_out, stride_out, i, offs_m, BM: tl.constexpr,
                 ACC_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                 SWAP: tl.constexpr):
    """Bias, ReLU and the store of one output tile: no extra pass over the output."""
    cols = i * BM + offs_m
    if SWAP:  # acc [BM, BLOCK_R]: stored through transposed pointers
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(ACC_DTYPE)[:, None]
        out = out_ptr + rows.to(tl.int64)[None, :] * stride_out + cols[:, None]
        row_ok = (rows < n_out)[None, :]
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(ACC_DTYPE)[None, :]
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
        row_ok = (rows < n_out)[:, None]
    if RELU:
        acc = tl.where(acc < 0, tl.zeros_like(acc), acc)  # NaN stays NaN, as torch.relu
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["nnz_log2"])
def dds_nn_kernel(a_ptr, values_ptr, t_offsets_ptr, t_rows_ptr, t_perm_ptr, out_ptr, mask_ptr,
                  n_out, stride_a, stride_out,
                  H, W, C, R, S, P, Q, sh, sw, ph, pw, dh, dw, nnz_log2,
                  BM: tl.constexpr, BK: tl.constexpr, BLOCK_R: tl.constexpr,
                  SWAP: tl.constexpr, LINE_MAJOR: tl.constexpr,
                  IS_CONV: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr, HAS_MASK: tl.constexpr, K_STEP: tl.constexpr = 0):
    """SWAP accumulates the transposed tile W_blk^T @ dy^T ([BK, BLOCK_R]), as in dds_nt;
    LINE_MAJOR and nnz_log2 (per block column here) as there. K_STEP > BM: K_STEP // BM
    blocks of the block column (and tap) per step, one MMA K_STEP deep (conv included: a tap's
    blocks share their source rows)."""
    KG: tl.constexpr = K_STEP // BM if K_STEP > BM else 1  # blocks per step
    # cb: block of output columns (of input channels, for conv)
    pid_r, cb = _program_tile(tl.cdiv(n_out, BLOCK_R), LINE_MAJOR)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # output rows: input pixels for conv
    row_ok = rows < n_out
    offs_m = tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    if SWAP:
        acc = tl.zeros((BK, BLOCK_R), dtype=ACC_DTYPE)
    else:
        acc = tl.zeros((BLOCK_R, BK), dtype=ACC_DTYPE)
    if IS_CONV:
        n = rows // (H * W)
        h = (rows % (H * W)) // W
        w = rows % W
    for tap in range(R * S):
        if IS_CONV:
            # the output pixel (p, q) that reads input (h, w) through tap (r, s), if any
            hp = h + ph - (tap // S) * dh
            wq = w + pw - (tap % S) * dw
            pp = hp // sh
            qq = wq // sw
            ok = row_ok & (hp >= 0) & (wq >= 0) & (hp % sh == 0) & (wq % sw == 0) \
                & (pp < P) & (qq < Q)
            src = (n * P + pp) * Q + qq
        else:
            ok = row_ok
            src = rows
        j = tap * (C // BK) + cb  # block column of W
        start = tl.load(t_offsets_ptr + j)
        end = tl.load(t_offsets_ptr + j + 1)
        if KG > 1:
            offs_g = tl.arange(0, KG * BM)  # the step's dy columns, block after block
            for t in range(start, end, KG):
                q = t + offs_g // BM  # position in the block column of each column
                has_g = q < end
                blk = tl.load(t_perm_ptr + q, mask=has_g, other=0).to(tl.int64)
                row0 = tl.load(t_rows_ptr + q, mask=has_g, other=0) * BM
                dcol = tl.max_contiguous(tl.multiple_of(row0 + offs_g % BM, BM), BM)
                at = src.to(tl.int64)[:, None] * stride_a + dcol[None, :]
                g_ok = ok[:, None] & has_g[None, :]
                g = tl.load(a_ptr + at, mask=g_ok, other=0.0)
                if HAS_MASK:
                    g = tl.where(tl.load(mask_ptr + at, mask=g_ok, other=0.0) > 0, g,
                                 tl.zeros_like(g))
                wv = tl.load(values_ptr + blk[:, None] * (BM * BK)
                             + (offs_g % BM)[:, None] * BK + offs_k[None, :],
                             mask=has_g[:, None], other=0.0)  # [KG*BM, BK]
                if SWAP:
                    acc = _dot(tl.trans(wv), tl.trans(g), acc, PRECISION, UPCAST)
                else:
                    acc = _dot(g, wv, acc, PRECISION, UPCAST)
        else:
            for t in range(start, end):
                blk = tl.load(t_perm_ptr + t).to(tl.int64)
                row0 = tl.load(t_rows_ptr + t) * BM
                at = src.to(tl.int64)[:, None] * stride_a + (row0 + offs_m)[None, :]
                g = tl.load(a_ptr + at, mask=ok[:, None], other=0.0)
                if HAS_MASK:  # a fused ReLU's backward: mask_ptr holds its output, laid out as a
                    g = tl.where(tl.load(mask_ptr + at, mask=ok[:, None], other=0.0) > 0, g,
                                 tl.zeros_like(g))
                wv = tl.load(values_ptr + blk * (BM * BK) + offs_m[:, None] * BK + offs_k[None, :])
                if SWAP:
                    acc = _dot(tl.trans(wv), tl.trans(g), acc, PRECISION, UPCAST)
                else:
                    acc = _dot(g, wv, acc, PRECISION, UPCAST)
    if SWAP:
        out = out_ptr + rows.to(tl.int64)[None, :] * stride_out + (cb * BK + offs_k)[:, None]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[None, :])
    else:
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + (cb * BK + offs_k)[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["nnz_log2"])
def sdd_kernel(a_ptr, b_ptr, row_offsets_ptr, row_idx_ptr, col_idx_ptr, out_ptr,
               nnz, n_block_cols, n_total, per_split, stride_a, stride_b,
               H, W, C, S, P, Q, sh, sw, ph, pw, dh, dw, nnz_log2,
               BM: tl.constexpr, BK: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr,
               Q_POW2: tl.constexpr, P_POW2: tl.constexpr, IS_CONV: tl.constexpr,
               ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """GROUP = 1: one program per stored block (x split of the reduction).
    GROUP > 1: one program per GROUP consecutive blocks of one block row (programs past the
    row's end do nothing): the dy tile is loaded once for all of them and the MMA is
    [BM, GROUP*BK] wide, against [BM, BK] per block. Its x columns are gathered per block, so
    the conv instance (a tap per block) computes source rows per column: correct, and left out
    of autotuning (ops._prune).
    The reduction runs over n_total rows (linear: the batch) or n_total = N*P image rows
    (conv), split per_split at a time over program_id(1). Conv steps through tiles of
    RP = BLOCK_R // QB image rows x QB columns (QB = min(next power of two >= Q, BLOCK_R)), the
    images stacked so that small maps fill the tile: pixel coordinates by shifts (and one
    division by P unless P_POW2 = P is a power of two), not the four runtime divisions per
    pixel and step of flat pixel rows. nnz_log2 (stored blocks per block row, log2) is only read
    by the autotuner's key."""
    split = tl.program_id(1)
    if GROUP == 1:
        p = tl.program_id(0)  # stored block (CSR position)
        row0 = tl.load(row_idx_ptr + p) * BM
        n_here = 1
    else:
        per_row = tl.cdiv(n_block_cols, GROUP)
        i = tl.program_id(0) // per_row  # block row
        p = tl.load(row_offsets_ptr + i) + (tl.program_id(0) % per_row) * GROUP
        n_here = tl.load(row_offsets_ptr + i + 1) - p  # blocks in this group (<= 0: none)
        row0 = i * BM
    offs_m = tl.arange(0, BM)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, GROUP * BK)  # the group's columns, block after block
    blk = offs_n // BK
    has = blk < n_here
    col0 = tl.load(col_idx_ptr + p + blk, mask=has, other=0) * BK  # in [0, R*S*C): int32
    tap = col0 // C
    xcol = tl.max_contiguous(tl.multiple_of(col0 % C + offs_n % BK, BK), BK)
    acc = tl.zeros((BM, GROUP * BK), dtype=ACC_DTYPE)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_total)
    if IS_CONV:  # steps are pixel tiles: RP image rows (n, p) x QB columns
        QB: tl.constexpr = Q_POW2 if Q_POW2 < BLOCK_R else BLOCK_R  # (min() folds on 3.6+ only)
        RP: tl.constexpr = BLOCK_R // QB
        n_qt = tl.cdiv(Q, QB)
        dp = offs_r // QB  # constexpr powers of two: shifts and masks
        dq = offs_r % QB
        if GROUP == 1:
            tap1 = tl.load(col_idx_ptr + p) * BK // C  # the block's one filter tap
        n_steps = tl.cdiv(hi - lo, RP) * n_qt
        step = 1
    else:
        n_steps = hi - lo
        step = BLOCK_R
    n_steps = tl.where(n_here > 0, n_steps, 0)  # an empty group takes no steps, stores nothing
    for t in range(0, n_steps, step):
        if IS_CONV:
            u = lo + (t // n_qt) * RP + dp  # image rows n*P + p (a tile may span images)
            if P_POW2 > 0:  # P a power of two: shifts
                n = u // P_POW2
            else:
                n = u // P
            pp = u - n * P
            qq = (t % n_qt) * QB + dq
            row_ok = (u < hi) & (qq < Q)
            rows = u * Q + qq  # output pixels: the rows of dy
            if GROUP == 1:
                src, ok = _conv_tap_rows(n * H, pp * sh - ph, qq * sw - pw, row_ok, tap1 // S,
                                         tap1 % S, H, W, dh, dw, IS_CONV)
                src = src[:, None]
                ok = ok[:, None]
            else:
                src, ok = _conv_tap_rows((n * H)[:, None], (pp * sh - ph)[:, None],
                                         (qq * sw - pw)[:, None],
                                         row_ok[:, None], (tap // S)[None, :], (tap % S)[None, :],
                                         H, W, dh, dw, IS_CONV)
        else:
            rows = lo + t + offs_r
            row_ok = rows < hi
            src = rows.to(tl.int64)[:, None]
            ok = row_ok[:, None]
        g = tl.load(a_ptr + rows.to(tl.int64)[:, None] * stride_a + (row0 + offs_m)[None, :],
                    mask=row_ok[:, None], other=0.0)
        x = tl.load(b_ptr + src * stride_b + xcol[None, :], mask=ok & has[None, :], other=0.0)
        acc = _dot(tl.trans(g), x, acc, PRECISION, UPCAST)
    out = out_ptr + (split * nnz + p + blk).to(tl.int64)[None, :] * (BM * BK) \
        + offs_m[:, None] * BK + (offs_n % BK)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=has[None, :])
