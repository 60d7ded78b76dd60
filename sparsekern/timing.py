"""Wall-clock timing shared by the demo and the benchmarks."""
import time


def median_ms(fn, repeats: int = 9, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3
