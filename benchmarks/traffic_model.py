"""Bytes the Triton kernels move, modelled without a GPU: what bounds them, and what the issue's
targets ask of the memory system.

    python benchmarks/traffic_model.py [--tbs 5.5]

Three models:
- `product_bytes`: bytes one product reads and writes through the L2 at a given tile shape.
  Every stored block of W reads its whole batch x block-width slice of the dense operand, so
  for a random block pattern the traffic per FLOP is fixed by the block shape, not the sparsity:
  y = x @ W^T moves about 1/bm + 1/BLOCK_R bytes per FLOP (bf16). bench_triton_gpu divides
  these by the measured times (the "TB/s" columns): a kernel at the same TB/s at every
  sparsity is bandwidth-bound.
- `ceilings`: the most a random block pattern can gain over dense at a given L2 -> SM
  bandwidth, at the kernels' tiles and with unbounded ones (x's traffic alone: a stored block's
  x slice serves only its block's bm output features, so 1/bm bytes per FLOP for a program
  over one block row, whatever its batch tile; tiles over several block rows share little of
  x in a random pattern). What the issue's speedup targets would ask of the L2.
- `l2_reads`: an LRU model of the L2 under dds's two program orders (kernels._program_tile),
  counting the bytes that miss it (read from memory): why ops._line_major picks line-major
  while W is small.
"""
from __future__ import annotations

import argparse
import collections
import random


def product_bytes(product: str, nnz: int, batch: int, bm: int, bk: int, n_rows: int,
                  n_cols: int, block_r: int = 128, group: int = 1, elem: int = 2) -> int:
    """Bytes through the L2 of one product on W [n_rows, n_cols] with nnz stored bm x bk
    blocks and a batch of `batch` rows, at the kernel's tile (BLOCK_R rows; sdd: GROUP blocks
    share one dy tile):
        "nt"  y = x @ W^T   per block: x [batch, bk] + W's block per row tile; writes y
        "nn"  dx = dy @ W   per block: dy [batch, bm] + W's block per row tile; writes dx
        "sdd" dW = dy^T @ x per block: x [batch, bk], dy [batch, bm] per group; writes dW
    (sdd's groups never span block rows: ceil(nnz / group) dy tiles slightly undercounts them
    for group > 1)."""
    block = bm * bk
    tiles = -(-batch // block_r)
    if product == "nt":
        moved = nnz * (batch * bk + tiles * block) + batch * n_rows
    elif product == "nn":
        moved = nnz * (batch * bm + tiles * block) + batch * n_cols
    elif product == "sdd":
        moved = nnz * batch * bk + -(-nnz // group) * batch * bm + nnz * block
    else:
        raise ValueError(f"product must be 'nt', 'nn' or 'sdd', not {product!r}")
    return moved * elem


def product_flops(nnz: int, batch: int, bm: int, bk: int) -> int:
    return 2 * nnz * bm * bk * batch


def ceilings(bm: int, bk: int, sparsity: float, tbs: float, dense_us: float,
             dense_fb_us: float, n: int = 4096, batch: int = 4096, block_r: int = 256) -> dict:
    """Floors (us) of the forward (x @ W^T) and forward+backward (+ dy @ W, dy^T @ x) for a
    W [n, n] of bm x bk blocks at `sparsity`, bf16, if every product ran at `tbs` TB/s through
    the L2, and the speedups over dense's measured times they would allow:
        "fwd_us", "x_dense": at the kernels' tiles (BLOCK_R rows; sdd's GROUP 4)
        "fwd_unbounded_us", "x_dense_unbounded": tiles of any size, reads of the operand that
            is re-read per stored block alone (x: 1/bm bytes per FLOP; dy in dy @ W: 1/bk;
            sdd shares the wider of the two and re-reads the other: 1/max(bm, bk))
        "fb_us", "x_dense_fb", "fb_unbounded_us", "x_dense_fb_unbounded": the same for the
            three products together."""
    nnz = round((1 - sparsity) * (n // bm) * (n // bk))
    flops = product_flops(nnz, batch, bm, bk)
    at = {p: product_bytes(p, nnz, batch, bm, bk, n, n, block_r=block_r,
                           group=4 if p == "sdd" else 1) for p in ("nt", "nn", "sdd")}
    # 2 bytes per element and 2 FLOP per multiply-add: bytes/FLOP is 1/(the re-read operand's
    # reuse)
    unbounded = {"nt": flops / bm, "nn": flops / bk, "sdd": flops / max(bm, bk)}

    def us(moved):
        return moved / tbs / 1e6

    fwd, fb = us(at["nt"]), us(sum(at.values()))
    fwd_u, fb_u = us(unbounded["nt"]), us(sum(unbounded.values()))
    return {"fwd_us": fwd, "x_dense": dense_us / fwd, "fwd_unbounded_us": fwd_u,
            "x_dense_unbounded": dense_us / fwd_u, "fb_us": fb, "x_dense_fb": dense_fb_us / fb,
            "fb_unbounded_us": fb_u, "x_dense_fb_unbounded": dense_fb_us / fb_u}


def random_rows(n_lines: int, n_blocks: int, density: float, rng: random.Random) -> list:
    """Sorted block indices per line, round(density * n_blocks) of them (a random pattern)."""
    per_line = round(density * n_blocks)
    return [sorted(rng.sample(range(n_blocks), per_line)) for _ in range(n_lines)]


def l2_reads(line_major: bool, n: int = 4096, batch: int = 4096, blk: int = 64,
             density: float = 0.1, block_r: int = 128, l2_mb: float = 50, in_flight: int = 528,
             elem: int = 2, seed: int = 0) -> tuple[float, float]:
    """(MB read from memory, MB through the L2) for y = x @ W^T, W [n, n] of blk x blk blocks
    at `density`, x [batch, n]: dds_nt's programs (row tile, block row) start in the order of
    kernels._program_tile, `in_flight` at a time (4 per SM of an H100), each stepping through
    its row's blocks in lockstep with the others; the L2 is an LRU of l2_mb over x tiles, W
    blocks and output tiles (written, so allocated, not read)."""
    rows = random_rows(n // blk, n // blk, density, random.Random(seed))
    n_tiles, n_lines = -(-batch // block_r), n // blk
    order = ([(t, i) for t in range(n_tiles) for i in range(n_lines)] if line_major else
             [(t, i) for i in range(n_lines) for t in range(n_tiles)])
    capacity = l2_mb * 2**20
    cache: collections.OrderedDict = collections.OrderedDict()
    used = missed = total = 0

    def touch(key, size, write=False):
        nonlocal used, missed, total
        total += size
        if key in cache:
            cache.move_to_end(key)
            return
        missed += 0 if write else size
        cache[key] = size
        used += size
        while used > capacity:
            used -= cache.popitem(last=False)[1]

    x_tile, w_block, y_tile = block_r * blk * elem, blk * blk * elem, block_r * blk * elem
    for start in range(0, len(order), in_flight):
        wave = order[start:start + in_flight]
        for step in range(max(len(rows[i]) for _, i in wave)):
            for t, i in wave:
                if step < len(rows[i]):
                    touch(("x", t, rows[i][step]), x_tile)
                    touch(("w", i, rows[i][step]), w_block)
        for t, i in wave:
            touch(("y", t, i), y_tile, write=True)
    return missed / 1e6, total / 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tbs", type=float, default=5.5,
                        help="L2 -> SM bandwidth to price the traffic at, TB/s")
    parser.add_argument("--dense-us", type=float, default=165,
                        help="dense x @ W^T's time, us (H100, 2026-11-28: 0.165 ms)")
    parser.add_argument("--dense-fb-us", type=float, default=498,
                        help="dense forward+backward's time, us (H100, 2026-11-28: 0.498 ms)")
    args = parser.parse_args(argv)

    print("y = x @ W^T, bf16, BLOCK_R 128 (sdd: GROUP 1), 4096x4096 W, batch 4096:")
    print(f"{'block':>6} {'sparsity':>8} {'product':>7} {'MB':>7} {'FLOP/B':>6} "
          f"{'floor us at ' + str(args.tbs) + ' TB/s':>22}")
    for blk in (32, 64, 128):
        for sparsity in (0.5, 0.9, 0.99):
            nnz = round((1 - sparsity) * (4096 // blk) ** 2)
            for product in ("nt", "nn", "sdd"):
                moved = product_bytes(product, nnz, 4096, blk, blk, 4096, 4096)
                flops = product_flops(nnz, 4096, blk, blk)
                print(f"{blk:>6} {sparsity:>8.2f} {product:>7} {moved / 1e6:7.0f} "
                      f"{flops / moved:6.1f} {moved / args.tbs / 1e6:22.1f}")

    print(f"\nCeilings at {args.tbs} TB/s against dense ({args.dense_us:g} us forward, "
          f"{args.dense_fb_us:g} us forward+backward), 4096x4096 W, batch 4096, bf16: the "
          f"kernels' tiles (BLOCK_R 256, sdd GROUP 4) / unbounded tiles")
    print(f"{'block':>8} {'sparsity':>8} {'fwd us':>14} {'x dense':>13} {'f+b us':>14} "
          f"{'x dense f+b':>13}")
    for bm, bk in ((32, 32), (64, 64), (128, 128), (128, 32), (128, 64)):
        for sparsity in (0.9, 0.95, 0.99):
            c = ceilings(bm, bk, sparsity, args.tbs, args.dense_us, args.dense_fb_us)
            pair = [("fwd_us", "fwd_unbounded_us", "6.0f"),
                    ("x_dense", "x_dense_unbounded", "5.1f"), ("fb_us", "fb_unbounded_us", "6.0f"),
                    ("x_dense_fb", "x_dense_fb_unbounded", "5.1f")]
            cells = [f"{c[a]:{fmt}} /{c[b]:{fmt}}" for a, b, fmt in pair]
            print(f"{f'{bm}x{bk}':>8} {sparsity:>8.2f} " + " ".join(cells))

    print("\nL2 LRU model, dds_nt, batch 4096, 64x64 blocks: MB read from memory "
          "(tile-major -> line-major)")
    for n, density in ((4096, 0.1), (8192, 0.1), (8192, 0.5)):
        for l2_mb in (25, 50):
            tile = l2_reads(False, n=n, density=density, l2_mb=l2_mb)[0]
            line = l2_reads(True, n=n, density=density, l2_mb=l2_mb)[0]
            print(f"  {n}x{n} {1 - density:.0%} sparse, L2 {l2_mb} MB: {tile:6.0f} -> {line:6.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
