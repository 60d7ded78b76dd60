"""Wall-clock timing shared by the demo and the benchmarks."""
import time


def median_ms(fn, repeats: int = 9, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds, after `warmup` untimed calls."""
    return interleaved_medians_ms({"fn": fn}, repeats, warmup)["fn"]


def interleaved_medians_ms(fns: dict, repeats: int = 9, warmup: int = 1) -> dict:
    """Median wall time in ms of each fn in `fns` (name -> callable), timed round-robin: one
    call of each per round, so a machine whose speed drifts (shared cores, frequency) slows
    every contender alike and the ratios between them stay fair."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}
