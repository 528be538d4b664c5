"""Latency measurement: interleaved rounds, warm-up excluded, medians and percentiles."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional


@dataclass
class LatencyStats:
    times_ms: List[float] = field(default_factory=list)

    def pct(self, q: float) -> float:
        xs = sorted(self.times_ms)
        if not xs:
            return float("nan")
        k = (len(xs) - 1) * q
        lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    @property
    def p50(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else float("nan")

    @property
    def p90(self) -> float:
        return self.pct(0.90)

    @property
    def p99(self) -> float:
        return self.pct(0.99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times_ms) if self.times_ms else float("nan")

    @property
    def n(self) -> int:
        return len(self.times_ms)

    def throughput(self, batch: int) -> float:
        """Images per second at the median latency (``batch`` images per call)."""
        p50 = self.p50
        return batch * 1e3 / p50 if p50 and p50 == p50 and p50 > 0 else float("nan")

    def summary(self, batch: int = 1) -> Dict[str, float]:
        """Plain numbers for reports: percentiles in ms, throughput in images/s, sample count."""
        return {
            "p50_ms": self.p50, "p90_ms": self.p90, "p99_ms": self.p99, "mean_ms": self.mean,
            "throughput_ips": self.throughput(batch), "samples": self.n,
        }


def interleaved(
    runners: Dict[str, Callable[[], object]],
    rounds: int = 10,
    iters: int = 5,
    warmup: int = 2,
    sync: Optional[Callable[[], None]] = None,
    progress: Optional[Callable[[], None]] = None,
) -> Dict[str, LatencyStats]:
    """Time each runner in turn, round after round, so drift and noise hit all of them alike.

    Each sample is one call's wall time in ms; ``warmup`` calls per runner are made first and dropped.
    """
    sync = sync or (lambda: None)
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    sync()
    stats = {name: LatencyStats() for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            for _ in range(iters):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                stats[name].times_ms.append((time.perf_counter() - t0) * 1e3)
        if progress:
            progress()
    return stats
