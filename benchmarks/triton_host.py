"""Host time of eager calls through the Triton backend, measured without a GPU.

`CompileOnlyDriver` stands in for Triton's CUDA driver: it compiles as the real one would
(Triton's bundled ptxas; for this machine's GPU, else sm_90) and launches nothing, so Triton's
whole per-call path (the autotuner, the JIT's binder and caches), our launchers and autograd run
as they do on a GPU machine, on CPU tensors that stand in for CUDA ones. What it leaves out: the GPU's work, the C
launcher (a few us a launch) and CUDA allocations.

    python benchmarks/triton_host.py [--check] [--profile]

Prints microseconds of host time per eager call (forward under no_grad, forward+backward) of a
sparse Linear and a 3x3 conv, side by side: launches through Triton's own path (the autotuner
and the JIT per call; what a launch hook, a profiler's say, gets) and ops._launch's direct
launches of the kernel compiled for those arguments.

--check (the tests run it in a subprocess without TRITON_INTERPRET) exits 1 unless: the
autotuner's path with two candidates per kernel and its on-disk cache (a fresh one) work, the
tunings written and read back (a tl.dtype in a tuning key raised TypeError there after the
first tuning, on the GPU too); and the direct launches of ops._launch hand the launcher the
same kernel, grid and arguments as Triton's own path did.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch


class _Utils:
    loaded = 0

    def load_binary(self, name, kernel, shared, device):
        _Utils.loaded += 1  # a token per loaded kernel: launches show which kernel they ran
        # module, function, registers, spills, threads (a module: Triton loads a kernel once)
        return _Utils.loaded, _Utils.loaded, 64, 0, 1024

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32}


class CompileOnlyDriver:
    """Triton's driver interface for a CUDA target with no device work: kernels compile (for
    this machine's GPU if it has one, else sm_90), launches are recorded in `launches` (grid,
    kernel, kernel metadata, whether launch hooks were passed, arguments) when `record` is
    set."""

    def __init__(self):
        major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
        self.arch = 10 * major + minor
        self.utils = _Utils()
        self.launches: list = []
        self.record = False
        self.benchmarked = 0
        owner = self

        class Launcher:
            def __init__(self, src, metadata):
                pass

            def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata,
                         enter_hook, exit_hook, *args):
                if owner.record:
                    owner.launches.append(((gx, gy, gz), function, packed_metadata,
                                           enter_hook is not None, args))

        self.launcher_cls = Launcher

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        def do_bench(fn, quantiles=None, **kwargs):  # the autotuner's timing: a launch each
            fn()
            self.benchmarked += 1
            t = 1.0 / self.benchmarked  # the last one timed wins: not the first config
            return [t, t, t] if quantiles else t
        return do_bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(16)

    def clear_cache(self, cache):
        pass


def install() -> CompileOnlyDriver:
    """Make Triton use a CompileOnlyDriver and the Triton backend take CPU tensors. The
    autotuners stop writing their timings to Triton's disk cache: this driver's are not times
    (on a GPU machine a real run would load them)."""
    from triton.runtime.driver import driver

    import sparsekern.triton as sk_triton

    if sk_triton.interpreting():
        raise SystemExit("triton_host: unset TRITON_INTERPRET (the interpreter replaces the "
                         "kernels)")
    fake = CompileOnlyDriver()
    driver.set_active(fake)
    sk_triton.TritonBackend.refuse = lambda self, *args, **kwargs: None
    from sparsekern.triton import ops as tops

    for tuner in (tops.dds_nt, tops.dds_nn, tops.sdd_k):
        tuner.cache_results = False
    return fake


def cases():
    """(name, forward, forward+backward) eager calls on small CPU tensors (so the few ATen ops
    that do run, a bias gradient's sum say, cost little): a 512x512 Linear with bias, batch
    64 (also with x 2 bytes off alignment, and batch 40: other specializations of the same
    kernels; in float16, all else alike; without the bias, only a flag apart; with a fused ReLU
    and the input gradient alone, which takes the masked dy @ W), and a 3x3 64->64 conv on 8x8
    maps, batch 2; 64x64 / 32x32 blocks at 50%."""
    import sparsekern
    from sparsekern.bsr import BlockSparseMatrix

    torch.manual_seed(0)
    dt = torch.bfloat16
    w = BlockSparseMatrix.random((512, 512), (64, 64), 0.5, dtype=dt)
    values = w.values.clone().requires_grad_()
    wg = w.with_values(values)
    bias = torch.randn(512, dtype=dt, requires_grad=True)
    x = torch.randn(64, 512, dtype=dt, requires_grad=True)
    # the same rows 2 bytes off 16-byte alignment: Triton compiles another kernel for them
    x_off = torch.randn(64 * 512 + 1, dtype=dt)[1:].view(64, 512).requires_grad_()
    g = torch.randn(64, 512, dtype=dt)
    # 40 rows: not a multiple of 16, another specialization of the batch size
    x40, g40 = torch.randn(40, 512, dtype=dt, requires_grad=True), torch.randn(40, 512, dtype=dt)
    half = torch.float16  # same dot mode and constexprs as bfloat16: only the dtypes differ
    values16 = w.values.to(half).requires_grad_()
    w16 = w.with_values(values16)
    x16, g16 = x.detach().to(half).requires_grad_(), g.to(half)

    conv = sparsekern.SparseConv2d(64, 64, 3, padding=1, block_size=(32, 32), density=0.5,
                                   backend="triton").to(dt)
    xc = torch.randn(2, 64, 8, 8, dtype=dt, requires_grad=True).contiguous(
        memory_format=torch.channels_last)
    gc = torch.randn(2, 64, 8, 8, dtype=dt).contiguous(memory_format=torch.channels_last)
    conv_params = [xc] + [p for p in conv.parameters() if p.requires_grad]

    for name, fn, grad, inputs in (
            ("linear", lambda: sparsekern.bsr_linear(x, wg, bias, backend="triton"), g,
             (x, values, bias)),
            ("linear, unaligned x", lambda: sparsekern.bsr_linear(x_off, wg, bias,
                                                                  backend="triton"),
             g, (x_off, values, bias)),
            ("linear, batch 40", lambda: sparsekern.bsr_linear(x40, wg, bias, backend="triton"),
             g40, (x40, values, bias)),
            ("linear, float16", lambda: sparsekern.bsr_linear(x16, w16, backend="triton"), g16,
             (x16, values16)),
            ("linear, no bias", lambda: sparsekern.bsr_linear(x, wg, backend="triton"), g,
             (x, values)),
            # the fused ReLU, weights frozen (an attack step): dy @ W reads the ReLU's mask
            ("linear, relu, dx only", lambda: sparsekern.bsr_linear(
                x, w, bias.detach(), backend="triton", activation="relu"), g, (x,)),
            ("conv", lambda: conv(xc), gc, conv_params)):
        def forward(fn=fn):
            with torch.no_grad():
                fn()

        def forward_backward(fn=fn, grad=grad, inputs=inputs):
            torch.autograd.grad(fn(), inputs, grad)
        yield name, forward, forward_backward


def host_us(fn, calls=200, repeats=5) -> float:
    """Best over `repeats` of the mean host time per call, microseconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def _comparable(args) -> list:
    """Launch arguments with tensors as (dtype, shape, stride): outputs are new every call."""
    return [(a.dtype, tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a
            for a in args]


def _launches(fake: CompileOnlyDriver, fn) -> tuple[list, list]:
    """fn's launches ([(grid, kernel, metadata, comparable arguments)]) and, per launch,
    whether it went Triton's way (with launch hooks) rather than directly."""
    fake.launches.clear()
    fake.record = True
    try:
        fn()
    finally:
        fake.record = False
    return ([(grid, function, meta, _comparable(args))
             for grid, function, meta, _, args in fake.launches],
            [hooked for *_, hooked, _ in fake.launches])


def _this_calls_tensors(fake: CompileOnlyDriver) -> list[str]:
    """Direct launches pass the tensors of their own call (the cache holds kernels, not
    arguments): two inputs alike but for their memory, then the first again."""
    from sparsekern.bsr import BlockSparseMatrix
    from sparsekern.triton import ops as tops

    w = BlockSparseMatrix.random((256, 256), (64, 64), 0.5, dtype=torch.bfloat16)
    topo = w.topology()
    x1 = torch.randn(32, 256, dtype=torch.bfloat16)
    x2 = x1.clone()
    problems = []
    for x in (x1, x2, x1, x2):
        fake.launches.clear()
        fake.record = True
        try:
            out = tops.dds(x, w.values, topo[0], topo[1], *topo[3:], 256, 256, True, "tf32")
        finally:
            fake.record = False
        args = fake.launches[-1][-1]
        if args[0].data_ptr() != x.data_ptr() or args[4].data_ptr() != out.data_ptr():
            problems.append("a direct launch passed another call's tensors")
    return problems


def _densities_tuned_apart() -> list[str]:
    """Two sparsities of one shape get a tuning each (the key's nnz_log2): the 99% run of a
    benchmark must not inherit the 90% run's config."""
    from sparsekern.bsr import BlockSparseMatrix
    from sparsekern.triton import ops as tops

    x = torch.randn(48, 512, dtype=torch.bfloat16)  # a batch the cases leave untuned
    before = len(tops.dds_nt.cache)
    for density in (0.5, 0.1):
        w = BlockSparseMatrix.random((512, 512), (64, 64), density, dtype=torch.bfloat16)
        topo = w.topology()
        tops.dds(x, w.values, topo[0], topo[1], *topo[3:], 512, 512, True, "tf32")
    if len(tops.dds_nt.cache) - before != 2:
        return ["two sparsities of one shape shared a tuning (the key lacks the density)"]
    return []


def _no_op(metadata):
    pass


@contextlib.contextmanager
def triton_path(on: bool = True):
    """Within the block (if `on`), launches go Triton's own way: a launch hook, as a profiler's
    would be, turns ops._launch's direct launches off."""
    import triton

    hooks = triton.knobs.runtime.launch_enter_hook
    if on:
        hooks.add(_no_op)
    try:
        yield
    finally:
        hooks.remove(_no_op)


def check(fake: CompileOnlyDriver) -> list[str]:
    """Problems found (empty when none): see the module docstring. Per case, Triton's own path
    (forced by a launch hook, as a profiler's would) is the reference for the launches that
    follow, which must all be direct; the cases share shapes and weights, so a launch cache
    keyed too coarsely (without the pointers' alignment, the dtypes, a flag) would launch an
    earlier case's kernel."""
    from sparsekern.triton import ops as tops

    problems = []
    tuners = (tops.dds_nt, tops.dds_nn, tops.sdd_k)
    for tuner in tuners:  # tune (and cache to disk) over two of other BLOCK_R: quick
        first = tuner.configs[0]
        tuner.configs = [first, next(c for c in tuner.configs
                                     if c.kwargs["BLOCK_R"] != first.kwargs["BLOCK_R"])]
        tuner.cache_results = True
    for name, _, forward_backward in cases():
        try:
            with triton_path():
                forward_backward()  # tunes and compiles
                reference, hooked = _launches(fake, forward_backward)
        except Exception as err:  # noqa: BLE001 - the failure is the finding
            return problems + [f"{name}: {type(err).__name__}: {err}"]
        # the first call fills the launch cache (through Triton's path), the next ones use it
        calls = [_launches(fake, forward_backward) for _ in range(3)]
        if not reference or any(c != reference for c, _ in calls):
            problems.append(f"{name}: direct launches differ from Triton's path:\n"
                            f"  Triton's: {reference}\n  direct: {calls}")
        if not all(hooked) or any(any(h) for _, h in calls[1:]):
            problems.append(f"{name}: launches went the wrong way (Triton's path: {hooked}, "
                            f"direct: {[h for _, h in calls[1:]]})")
    problems += _this_calls_tensors(fake) + _densities_tuned_apart()
    if not fake.benchmarked:
        problems.append("the autotuner timed no config")
    # a new process: the tunings come from the disk cache, the kernels launch as before
    timed = fake.benchmarked
    tops._compiled.clear()
    for tuner in tuners:
        tuner.cache.clear()
    for name, _, forward_backward in cases():
        forward_backward()
    if fake.benchmarked != timed:
        problems.append("the tunings cached on disk were not used")
    if not tops._compiled:
        problems.append("no launch went the direct way (ops._compiled is empty)")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the tuned or the direct launch path misbehaves")
    parser.add_argument("--profile", action="store_true",
                        help="also a cProfile of the forward+backward calls")
    args = parser.parse_args(argv)
    fake = install()
    if args.check:
        import shutil
        import tempfile

        # a cold cache: the tuning runs, and its results are written and read back
        cache = os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_host_")
        try:
            problems = check(fake)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        print("\n".join(problems) or "triton_host check: tuned and direct launches agree")
        return 1 if problems else 0
    print(f"{'':22s} {'forward us':>22s} {'forward+backward us':>24s}\n{'':22s} "
          f"{'Triton path':>11s} {'direct':>10s} {'Triton path':>13s} {'direct':>10s}  launches")
    for name, forward, forward_backward in cases():
        forward_backward()  # tune and compile
        launches, _ = _launches(fake, forward_backward)
        times = []
        for on in (True, False):
            with triton_path(on):
                times += [host_us(forward), host_us(forward_backward)]
        print(f"{name:22s} {times[0]:11.1f} {times[2]:10.1f} {times[1]:13.1f} {times[3]:10.1f}"
              f"  {len(launches)}", flush=True)
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.runcall(lambda: [forward_backward() for _ in range(200)])
            pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
