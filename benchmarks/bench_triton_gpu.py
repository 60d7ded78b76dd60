"""Backend "triton" on a CUDA GPU against cuBLAS (F.linear / cuDNN F.conv2d) and torch.sparse's
bsr_dense_mm, one process, medians of triton.testing.do_bench. Correctness first (relative
error against the dense product on the same operands). Run by benchmarks/gpu_suite.sh.

    python benchmarks/bench_triton_gpu.py [--quick] [--json PATH]

Rows are written to the JSON after every case, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, print_table, write_json  # noqa: E402
from traffic_model import product_bytes  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.bsr import BlockSparseMatrix  # noqa: E402

DTYPE = torch.bfloat16
DEVICE = "cuda"  # the tests' smoke run sets "cpu" (Triton interpreter)


def ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def graph_ms(fn) -> float:
    """fn's median as replays of a captured CUDA graph: the GPU time without the per-call host
    cost (Python dispatch, autotuner lookup, launch), to tell the two apart. NaN if capture fails."""
    try:
        fn()  # autotune and compile outside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return ms(graph.replay)
    except Exception as err:  # noqa: BLE001 - report, don't stop the suite
        print(f"CUDA graph capture failed: {err!r}", flush=True)
        return float("nan")


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def linear_operands(n, batch, blk, sparsity, device=None):
    """W [n, n] in blk x blk blocks and x [batch, n], seeded: the shapes (and so the kernels'
    specializations: nnz, rows) of every linear case in one place, which triton_warm_cache.py
    replays on the CPU to compile the kernels ahead."""
    torch.manual_seed(0)
    w = BlockSparseMatrix.random((n, n), (blk, blk), 1 - sparsity, dtype=DTYPE).to(
        device or DEVICE)
    return w, torch.randn(batch, n, device=device or DEVICE, dtype=DTYPE)


def conv_layer(c_in, c_out, blk, sparsity, device=None, stride=1):
    """The 3x3 SparseConv2d of a conv case, seeded (as linear_operands)."""
    torch.manual_seed(0)
    return sparsekern.SparseConv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False,
                                   block_size=(blk, blk), density=1 - sparsity).to(
        device or DEVICE, DTYPE)


def cifar_conv_layers(models=("vgg-like", "resnet20")) -> list[tuple]:
    """(name, c_in, c_out, input size, stride) of each distinct 3x3 conv of the CIFAR models
    that the Triton backend can take (input channels a multiple of 16; the 3-channel first conv
    stays dense in the models' sparse builds), read off a forward pass of each model."""
    from sparsekern.models import build_model

    layers = {}
    for name in models:
        model = build_model(name)
        seen = []
        hooks = [m.register_forward_hook(lambda m, inputs, out: seen.append((m, inputs[0])))
                 for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            model.eval()(torch.zeros(1, *model.input_shape))
        for hook in hooks:
            hook.remove()
        for m, x in seen:
            geometry = (m.in_channels, m.out_channels, x.shape[-1], m.stride[0])
            if m.kernel_size == (3, 3) and m.in_channels % 16 == 0 and geometry not in layers:
                c_in, c_out, hw, stride = geometry
                layers[geometry] = (f"{name.split('-')[0]} {c_in}->{c_out} {hw}x{hw}"
                                    + (f" s{stride}" if stride > 1 else ""), *geometry)
    return list(layers.values())


def linear_case(n, batch, blk, sparsity):
    w, x = linear_operands(n, batch, blk, sparsity)
    w_dense = w.to_dense().contiguous()
    ref = F.linear(x, w_dense)
    out = sparsekern.bsr_linear(x, w, backend="triton")
    err = rel_err(out, ref)
    if not err < 2e-2:
        raise SystemExit(f"triton forward wrong: n={n} batch={batch} block={blk} rel err {err}")
    row = {"kind": "linear", "shape": f"{n}x{n} b{batch}", "block": blk, "sparsity": sparsity,
           "rel_err": err,
           "dense_fwd": ms(lambda: F.linear(x, w_dense)),
           "ours_fwd": ms(lambda: sparsekern.bsr_linear(x, w, backend="triton")),
           "dense_fwd_graph": graph_ms(lambda: F.linear(x, w_dense)),
           "ours_fwd_graph": graph_ms(lambda: sparsekern.bsr_linear(x, w, backend="triton"))}
    try:
        w_bsr = w_dense.to_sparse_bsr((blk, blk))
        row["bsr_mm_fwd"] = ms(lambda: (w_bsr @ x.t()).t())
    except Exception as err:  # noqa: BLE001 - report, don't stop the suite
        print(f"bsr_dense_mm failed: {err!r}", flush=True)
        row["bsr_mm_fwd"] = float("nan")
    xg = x.clone().requires_grad_()
    wd = w_dense.clone().requires_grad_()
    values = w.values.clone().requires_grad_()
    wg = w.with_values(values)
    g = torch.randn_like(ref)

    def dense_fb():
        torch.autograd.grad(F.linear(xg, wd), (xg, wd), g)

    def ours_fb():
        torch.autograd.grad(sparsekern.bsr_linear(xg, wg, backend="triton"), (xg, values), g)

    row["dense_fb"], row["ours_fb"] = ms(dense_fb), ms(ours_fb)
    # the same forward+backward replayed as a CUDA graph: its GPU time alone, so the gap to the
    # eager time is the host's (Python, autograd, launches)
    row["dense_fb_graph"], row["ours_fb_graph"] = graph_ms(dense_fb), graph_ms(ours_fb)
    row.update(product_times(x, g, w, w_dense))
    return row


def host_profile(n=4096, batch=256, blk=64, sparsity=0.9, calls=100, top=25) -> str:
    """cProfile of eager forward+backward calls on a small batch, where the host's cost is all
    there is to see (the H100 run: ~1.1 ms per call at batch 256, against ~0.1 ms of GPU work):
    which Python functions (ours, autograd's, Triton's launch path) the time goes to."""
    import cProfile
    import io
    import pstats

    w, x = linear_operands(n, batch, blk, sparsity)
    x.requires_grad_()
    values = w.values.clone().requires_grad_()
    wg = w.with_values(values)
    g = torch.randn(batch, n, device=DEVICE, dtype=DTYPE)

    def fb():
        torch.autograd.grad(sparsekern.bsr_linear(x, wg, backend="triton"), (x, values), g)

    for _ in range(5):  # autotune and compile first
        fb()
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        for _ in range(calls):
            fb()
    finally:  # a profiler left on would slow every later case
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return (f"host profile: {calls} eager forward+backward calls, W {n}x{n}, batch {batch}, "
            f"{blk}x{blk} blocks at {sparsity:.0%}\n" + text.getvalue())


def product_times(x, dy, w, w_dense) -> dict:
    """GPU time (graph replays of the launchers, no host cost) of each of the three products
    against the dense product it replaces, and the configs the autotuner chose: which kernel the
    forward+backward time goes to."""
    from sparsekern.triton import ops as tops

    ro, ci, ri, to, tr, tp = w.topology()
    Mp, Kp = w.padded_shape
    bm, bk = w.block_shape
    prec = sparsekern.triton.float32_precision()
    products = {
        "nt": (lambda: tops.dds(x, w.values, ro, ci, to, tr, tp, Mp, Kp, True, prec),
               lambda: x @ w_dense.t()),
        "nn": (lambda: tops.dds(dy, w.values, ro, ci, to, tr, tp, Mp, Kp, False, prec),
               lambda: dy @ w_dense),
        "sdd": (lambda: tops.sdd(dy, x, ro, ri, ci, bm, bk, prec), lambda: dy.t() @ x)}
    tuners = {"nt": tops.dds_nt, "nn": tops.dds_nn, "sdd": tops.sdd_k}
    out = {}
    for name, (ours, dense) in products.items():
        out[f"{name}_ms"], out[f"{name}_dense_ms"] = graph_ms(ours), graph_ms(dense)
        out[f"x_{name}"] = out[f"{name}_dense_ms"] / out[f"{name}_ms"]
        # the modelled bytes through the L2 at the config the autotuner chose, per second: the
        # same TB/s at every sparsity is a bandwidth-bound kernel (traffic_model.py)
        chosen = getattr(getattr(tuners[name], "best_config", None), "kwargs", {})
        moved = product_bytes(name, w.values.shape[0], x.shape[0], bm, bk, Mp, Kp,
                              chosen.get("BLOCK_R", 128), chosen.get("GROUP", 1),
                              x.element_size())
        out[f"{name}_tbs"] = moved / (out[f"{name}_ms"] * 1e-3) / 1e12
    out["configs"] = {name: str(getattr(k, "best_config", None)) for name, k in
                      (("dds_nt", tops.dds_nt), ("dds_nn", tops.dds_nn), ("sdd", tops.sdd_k))}
    return out


def sweep_products(w, x) -> dict:
    """The variant sweep's launches by kernel name, on a square W [n, n] and x [batch, n] (x
    stands for dy too): what triton_warm_cache.py compiles ahead for the sweep."""
    from sparsekern.triton import ops as tops

    n = w.shape[0]
    ro, ci, ri, to, tr, tp = w.topology()
    bm, bk = w.block_shape
    return {"dds_nt": lambda: tops.dds(x, w.values, ro, ci, to, tr, tp, n, n, True, "tf32"),
            "dds_nn": lambda: tops.dds(x, w.values, ro, ci, to, tr, tp, n, n, False, "tf32"),
            "sdd": lambda: tops.sdd(x, x, ro, ri, ci, bm, bk, "tf32")}


def variant_sweep(n=4096, batch=4096, cases=((64, 0.9), (32, 0.9))) -> list[dict]:
    """Every autotuning candidate of dds_nt, dds_nn and sdd timed on its own (pinned_configs,
    graph replays) on the issue's target shapes: what each variant (TILES, SWAP, GROUP, BLOCK_R,
    warps, stages) buys, whatever the autotuner picks. dds_nn and sdd take x as dy (same shapes
    for a square W)."""
    from sparsekern.reference import dense_to_blocks
    from sparsekern.triton import ops as tops

    rows = []
    for blk, sparsity in cases:
        w, x = linear_operands(n, batch, blk, sparsity)
        _, ci, ri, *_ = w.topology()
        w_dense = w.to_dense()
        dense_ms = graph_ms(lambda: x @ w_dense.t())
        sdd_dense_ms = graph_ms(lambda: x.t() @ x)
        refs = {"dds_nt": x.float() @ w_dense.float().t(), "dds_nn": x.float() @ w_dense.float(),
                "sdd": dense_to_blocks(x.float().t() @ x.float(), ri, ci, blk, blk)}
        products = sweep_products(w, x)
        for kernel, candidates in (("dds_nt", tops._DDS_NT_CANDIDATES),
                                   ("dds_nn", tops._DDS_NN_CANDIDATES),
                                   ("sdd", tops._SDD_CANDIDATES)):
            for (r, warps, stages, variant), config in zip(candidates,
                                                          tops.candidate_configs(candidates)):
                try:
                    with tops.pinned_configs(**{kernel: config}):
                        got = products[kernel]()
                        t = graph_ms(products[kernel])
                except Exception as err:  # noqa: BLE001 - one failing variant is a finding
                    print(f"{kernel} {config}: {err!r}", flush=True)
                    got, t = None, float("nan")
                baseline = sdd_dense_ms if kernel == "sdd" else dense_ms
                err = float("nan") if got is None else rel_err(got, refs[kernel])
                rows.append({"kernel": kernel, "block": blk, "sparsity": sparsity,
                             "config": f"R{r} w{warps} s{stages} " + " ".join(
                                 f"{k}={int(v)}" for k, v in variant.items()),
                             "ms": t, "x_dense": baseline / t, "rel_err": err})
                print(rows[-1], flush=True)
    return rows


def program_orders(n=8192, batch=4096, blk=64, sparsity=0.9, timer=None, device=None
                   ) -> list[dict]:
    """x @ W^T and dy @ W, autotuned, with dds's programs tile-major and line-major
    (ops._line_major forced), graph replays: the L2 model's prediction to check
    (traffic_model.py: memory reads 419 -> 81 MB at 8192², batch 4096, 64x64, 90%)."""
    from sparsekern.triton import ops as tops

    timer = timer or graph_ms
    products = sweep_products(*linear_operands(n, batch, blk, sparsity, device))
    rows, chosen = [], tops._line_major
    try:
        for line_major in (False, True):
            tops._line_major = lambda values, flag=line_major: flag
            for kernel in ("dds_nt", "dds_nn"):
                t = timer(products[kernel])
                tuner = tops.dds_nt if kernel == "dds_nt" else tops.dds_nn
                rows.append({"kernel": kernel, "shape": f"{n}x{n} b{batch}", "block": blk,
                             "sparsity": sparsity, "line_major": line_major, "ms": t,
                             "config": str(getattr(tuner, "best_config", None))})
    finally:
        tops._line_major = chosen
    return rows


def conv_case(name, c_in, c_out, hw, batch, blk, sparsity, stride=1):
    layer = conv_layer(c_in, c_out, blk, sparsity, stride=stride)
    dense = layer.to_dense().to(DEVICE, DTYPE)
    x = torch.randn(batch, c_in, hw, hw, device=DEVICE, dtype=DTYPE).to(
        memory_format=torch.channels_last)
    with sparsekern.backend("triton"):
        err = rel_err(layer(x), dense(x))
    if not err < 2e-2:
        raise SystemExit(f"triton conv wrong: {name} rel err {err}")
    xg = x.clone().requires_grad_()

    def ours_f():
        with sparsekern.backend("triton"):
            layer(x)

    def ours_fb():
        with sparsekern.backend("triton"):
            layer(xg).sum().backward()

    return {"kind": "conv", "shape": f"{name} b{batch}", "block": blk, "sparsity": sparsity,
            "rel_err": err, "dense_fwd": ms(lambda: dense(x)), "ours_fwd": ms(ours_f),
            "dense_fwd_graph": graph_ms(lambda: dense(x)), "ours_fwd_graph": graph_ms(ours_f),
            "bsr_mm_fwd": float("nan"), "dense_fb": ms(lambda: dense(xg).sum().backward()),
            "ours_fb": ms(ours_fb)}


def benchmark_cases(quick: bool):
    """([(kind, params of linear_case / conv_case)], the variant sweep's (block, sparsity)).
    --quick fits a short lease: the first call per block shape autotunes ~28 candidates
    (compiled one after another, unless triton_warm_cache.py compiled them), so fewer block
    shapes matter more than fewer rows."""
    sizes = (4096,) if quick else (4096, 8192)
    batches = (4096, 256) if quick else (4096, 1024, 256)
    blocks = (64, 32) if quick else (64, 32, 128)
    sparsities = (0.9, 0.99) if quick else (0.5, 0.75, 0.9, 0.95, 0.99)
    cases = [("linear", (n, b, blk, s)) for n in sizes for b in batches for blk in blocks
             for s in sparsities]
    # conv: two VGG layers (--quick), or every conv layer of the CIFAR models (32x32 blocks,
    # 16x16 where a layer has 16 channels), and the 256-channel one in 64x64 blocks as well
    convs = [("vgg 128->128 16x16", 128, 128, 16, 1, 32), ("vgg 256->256 8x8", 256, 256, 8, 1, 64)]
    if not quick:
        convs = [(*layer, min(32, layer[1], layer[2])) for layer in cifar_conv_layers()] + convs[1:]
    for s in (0.9,) if quick else (0.5, 0.9):
        cases += [("conv", (name, c_in, c_out, hw, 128, blk, s, stride))
                  for name, c_in, c_out, hw, stride, blk in convs]
    return cases, ((64, 0.9), (32, 0.9))  # 32x32: the K_STEP variants


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="n=4096, 64x64 and 32x32 blocks, 90%% and 99%% only")
    parser.add_argument("--json", default="benchmarks/results/bench_triton_gpu.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_triton_gpu: no CUDA device here; run it on a GPU machine")
    info = {**machine_info(), "gpu": torch.cuda.get_device_name(), "dtype": str(DTYPE)}
    print(info, flush=True)
    cases, sweep_cases = benchmark_cases(args.quick)
    failures = []  # one part failing must not cost the rest of a short lease its numbers
    sweep = _attempt("variant sweep", failures, variant_sweep, [], cases=sweep_cases)
    write_json(args.json.replace(".json", "_variants.json"), info, sweep)
    orders = _attempt("program orders", failures, program_orders, [])
    print(orders, flush=True)
    write_json(args.json.replace(".json", "_orders.json"), info, orders)
    profile = _attempt("host profile", failures, host_profile, "host profile failed")
    rows = []
    for kind, params in cases:
        row = _attempt(f"{kind} {params}", failures,
                       linear_case if kind == "linear" else conv_case, None, *params)
        if row is None:  # (out of memory, say)
            continue
        rows.append(with_ratios(row))
        print(row, flush=True)
        write_json(args.json, info, rows)
    print_report(sweep, rows, profile, orders)
    if failures:
        print(f"\n{len(failures)} part(s) failed:\n" + "\n".join(failures))


def _traceback_tail(lines: int = 12) -> str:
    import traceback

    return "\n".join(traceback.format_exc().rstrip().splitlines()[-lines:])


def _attempt(what: str, failures: list, fn, fallback, *args, **kwargs):
    """fn(*args, **kwargs), or `fallback` (the failure recorded in `failures`) if it raises."""
    try:
        return fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 - a broken part must not stop the rest of the run
        failures.append(f"{what}: {_traceback_tail()}")
        print(f"{what} failed:\n{failures[-1]}", flush=True)
        return fallback


def with_ratios(row: dict) -> dict:
    row["x_dense_fwd"] = row["dense_fwd"] / row["ours_fwd"]
    row["x_bsr_mm_fwd"] = row["bsr_mm_fwd"] / row["ours_fwd"]
    row["x_dense_fb"] = row["dense_fb"] / row["ours_fb"]
    row["x_dense_fwd_graph"] = row["dense_fwd_graph"] / row["ours_fwd_graph"]
    if "ours_fb_graph" in row:
        row["x_dense_fb_graph"] = row["dense_fb_graph"] / row["ours_fb_graph"]
    return row


def print_report(sweep: list[dict], rows: list[dict], profile: str = "",
                 orders: list[dict] = ()) -> None:
    print("\n" + profile)
    print("\ndds program orders (graph replays; ops._line_major forced):")
    print_table(list(orders), [("kernel", "kernel", "s"), ("shape", "shape", "s"),
                               ("block", "block", "d"), ("sparsity", "sparsity", ".2f"),
                               ("line_major", "line-major", "d"), ("ms", "ms", ".4f"),
                               ("config", "config", "s")])
    print("\nvariant sweep (each autotuning candidate pinned; graph replays):")
    print_table(sweep, [("kernel", "kernel", "s"), ("block", "block", "d"),
                        ("sparsity", "sparsity", ".2f"), ("config", "config", "s"),
                        ("ms", "ms", ".4f"), ("x_dense", "x dense", ".2f"),
                        ("rel_err", "rel err", ".1e")])
    print("\nend to end (do_bench medians of the eager calls; graph = CUDA graph replays):")
    print_table(rows, [("shape", "shape", "s"), ("block", "block", "d"),
                       ("sparsity", "sparsity", ".2f"), ("dense_fwd", "dense ms", ".3f"),
                       ("bsr_mm_fwd", "bsr_mm ms", ".3f"), ("ours_fwd", "ours ms", ".3f"),
                       ("x_dense_fwd", "x dense", ".2f"), ("x_bsr_mm_fwd", "x bsr_mm", ".2f"),
                       ("dense_fb", "dense f+b", ".3f"), ("ours_fb", "ours f+b", ".3f"),
                       ("x_dense_fb", "x f+b", ".2f"), ("ours_fwd_graph", "graph ms", ".3f"),
                       ("x_dense_fwd_graph", "x graph", ".2f"), ("rel_err", "rel err", ".1e")])
    print("\nper product (graph replays; dense = the matmul each replaces; TB/s = bytes through "
          "the L2 modelled at the chosen tile, traffic_model.py):")
    print_table([r for r in rows if "nt_ms" in r], [
        ("shape", "shape", "s"), ("block", "block", "d"), ("sparsity", "sparsity", ".2f"),
        ("nt_ms", "x@W^T ms", ".3f"), ("x_nt", "x dense", ".2f"), ("nt_tbs", "TB/s", ".2f"),
        ("nn_ms", "dy@W ms", ".3f"), ("x_nn", "x dense", ".2f"), ("nn_tbs", "TB/s", ".2f"),
        ("sdd_ms", "sdd ms", ".3f"), ("x_sdd", "x dense", ".2f"), ("sdd_tbs", "TB/s", ".2f"),
        ("dense_fb_graph", "dense f+b graph", ".3f"), ("ours_fb_graph", "ours f+b graph", ".3f"),
        ("x_dense_fb_graph", "x f+b graph", ".2f")])
    print("\nconfigs the autotuner chose (last call of each kernel in the case):")
    for r in rows:
        if "configs" in r:
            print(f"  {r['shape']} block {r['block']} sparsity {r['sparsity']}: {r['configs']}")
    print("\nissue 6 targets (H100, bf16, eager do_bench medians):")
    for line in target_lines(rows):
        print("  " + line)


# (what, row's shape, block, sparsity, ratio key, at least); bsr_dense_mm: every linear row
TARGETS = [("64x64 at 90%, forward vs cuBLAS", "4096x4096 b4096", 64, 0.9, "x_dense_fwd", 6.0),
           ("32x32 at 90%, forward vs cuBLAS", "4096x4096 b4096", 32, 0.9, "x_dense_fwd", 4.0),
           ("64x64 at 90%, forward+backward vs dense", "4096x4096 b4096", 64, 0.9, "x_dense_fb",
            4.0)]


def target_lines(rows: list[dict]) -> list[str]:
    """One line per target of issue 6: the measured ratio, met or missed (or not measured:
    no such row, or NaN). bsr_dense_mm: the worst linear row, named."""
    def measured(row, key):
        value = row.get(key)
        return value is not None and value == value  # NaN: that measurement failed

    lines = []
    for what, shape, block, sparsity, key, goal in TARGETS:
        found = [r[key] for r in rows if (r["shape"], r["block"], r["sparsity"]) ==
                 (shape, block, sparsity) and measured(r, key)]
        lines.append(f"{what} >= {goal:g}x: " + (
            f"{found[0]:.2f}x, {'met' if found[0] >= goal else 'missed'}" if found
            else "not measured"))
    linear = [r for r in rows if r.get("kind") == "linear" and measured(r, "x_bsr_mm_fwd")]
    worst = min(linear, key=lambda r: r["x_bsr_mm_fwd"], default=None)
    lines.append("forward vs bsr_dense_mm >= 1.5x: " + (
        f"{worst['x_bsr_mm_fwd']:.2f}x at worst ({worst['shape']}, {worst['block']}x"
        f"{worst['block']}, {worst['sparsity']:.0%}) over {len(linear)} rows, "
        f"{'met' if worst['x_bsr_mm_fwd'] >= 1.5 else 'missed'}" if worst else "not measured"))
    return lines


if __name__ == "__main__":
    main()
