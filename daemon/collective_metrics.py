"""Collective metrics from the ranks' per-(op, group) summaries: durations, bytes, algbw and busbw.

Each report may carry ``collectives = {"op|group": {"count", "seconds", "bytes", "world"}}``,
cumulative per rank within an attempt; ``"hist": {"<le>": cumulative count}`` may add a
duration histogram on the bounds of ``DURATION_BUCKETS``. Deltas between a rank's
reports feed run-wide aggregates, so the exported counters never go backwards across
attempts. Without ``hist`` the observations of a delta land in the bucket of their mean.

Bandwidth follows nccl-tests (doc/PERFORMANCE.md): ``algbw = bytes / seconds`` with
``bytes`` the collective's size S on one rank, and ``busbw = algbw * factor(op, n)``:
all_reduce 2(n-1)/n; all_gather, reduce_scatter, all_to_all, gather, scatter (n-1)/n;
broadcast, reduce, send/recv 1. Both are over the last ``window_s`` of reported traffic.
"""

from __future__ import annotations

import bisect
import collections
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .report_section import ReportSection

DURATION_BUCKETS = (1e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
MAX_KEYS = 64  # distinct (op, group): bounded cardinality whatever the ranks send

_SUFFIXES = ("_into_tensor", "_tensor_coalesced", "_coalesced", "_tensor", "_base", "_single", "_object_list")


def normalize_op(op: str) -> str:
    """``gloo:all_gather_into_tensor`` -> ``all_gather``; ``alltoall`` -> ``all_to_all``."""
    op = op.rsplit(":", 1)[-1].strip().lower()
    if op.startswith("_"):
        op = op.lstrip("_")
    for suffix in _SUFFIXES:
        if op.endswith(suffix) and len(op) > len(suffix):
            op = op[: -len(suffix)]
            break
    return {"alltoall": "all_to_all", "allreduce": "all_reduce", "allgather": "all_gather"}.get(op, op)


def busbw_factor(op: str, world: int) -> float:
    """nccl-tests' bus-bandwidth factor of a collective over ``world`` ranks."""
    n = max(int(world), 1)
    op = normalize_op(op)
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter"):
        return (n - 1) / n
    return 1.0  # broadcast, reduce, send, recv, and anything point-to-point


@dataclass
class _Agg:
    world: int = 1
    count: int = 0
    seconds: float = 0.0
    bytes: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    window: collections.deque[tuple[float, int, float]] = field(default_factory=collections.deque)
    w_bytes: int = 0  # running sums over ``window``
    w_seconds: float = 0.0
    algbw: float | None = None


class CollectiveMetrics(ReportSection):
    """Run-wide collective aggregates; ``ingest`` per report, ``collect`` at scrape time."""

    section = "collectives"

    def __init__(self, *, window_s: float = 60.0) -> None:
        super().__init__()
        self.window_s = window_s
        self.dropped_keys = 0
        self._aggs: dict[tuple[str, str], _Agg] = {}
        self._prev: dict[tuple[int, str, int, str], tuple[int, float, int, dict[str, int]]] = {}

    def _take(self, rep: dict[str, Any], summaries: dict[str, Any], now: float) -> None:
        who = (int(rep.get("attempt", 0)), str(rep.get("role", "")), int(rep.get("rank", 0)))
        with self._lock:
            for key, s in summaries.items():
                if isinstance(s, dict):
                    self._ingest_one(who, str(key), s, now)

    def _ingest_one(self, who: tuple[int, str, int], key: str, s: dict[str, Any], now: float) -> None:
        op, _, group = key.partition("|")
        agg_key = (normalize_op(op), group or "default")
        agg = self._aggs.get(agg_key)
        if agg is None:
            if len(self._aggs) >= MAX_KEYS:
                self.dropped_keys += 1
                return
            agg = self._aggs[agg_key] = _Agg()
        count, seconds = int(s.get("count", 0)), _finite(s.get("seconds"))
        nbytes = int(s.get("bytes", s.get("nbytes", 0)) or 0)
        hist = {str(k): int(v) for k, v in (s.get("hist") or {}).items()}
        prev_key = (*who, key)
        p_count, p_seconds, p_bytes, p_hist = self._prev.get(prev_key, (0, 0.0, 0, {}))
        if count < p_count:  # the rank's counters restarted: all of it is new
            p_count, p_seconds, p_bytes, p_hist = 0, 0.0, 0, {}
        self._prev[prev_key] = (count, seconds, nbytes, hist)
        d_count, d_seconds, d_bytes = count - p_count, max(0.0, seconds - p_seconds), max(0, nbytes - p_bytes)
        if d_count <= 0:
            return
        agg.world = max(int(s.get("world", agg.world) or 1), 1)
        agg.count += d_count
        agg.seconds += d_seconds
        agg.bytes += d_bytes
        self._add_buckets(agg, d_count, d_seconds, hist, p_hist)
        if d_seconds > 0 and d_bytes > 0:
            agg.window.append((now, d_bytes, d_seconds))
            agg.w_bytes += d_bytes
            agg.w_seconds += d_seconds
        while agg.window and agg.window[0][0] < now - self.window_s:
            _, b, t = agg.window.popleft()
            agg.w_bytes -= b
            agg.w_seconds -= t
        if agg.window and agg.w_seconds > 0:
            agg.algbw = agg.w_bytes / agg.w_seconds

    @staticmethod
    def _add_buckets(
        agg: _Agg, d_count: int, d_seconds: float, hist: dict[str, int], p_hist: dict[str, int]
    ) -> None:
        bounds = [_fmt(b) for b in DURATION_BUCKETS]
        if hist and all(b in hist for b in bounds):
            cum_prev = 0
            for i, b in enumerate(bounds):
                cum = max(0, hist[b] - p_hist.get(b, 0))
                agg.buckets[i] += max(0, cum - cum_prev)
                cum_prev = max(cum_prev, cum)
            agg.buckets[-1] += max(0, d_count - cum_prev)
            return
        mean = d_seconds / d_count
        agg.buckets[bisect.bisect_left(DURATION_BUCKETS, mean)] += d_count

    def forget_before(self, attempt: int) -> None:
        """Drops the per-rank baselines of attempts before ``attempt`` (their ranks are gone)."""
        with self._lock:
            self._prev = {k: v for k, v in self._prev.items() if k[0] >= attempt}

    def collect(self) -> Iterator[Metric]:
        labels = ["op", "group"]
        dur = HistogramMetricFamily(
            "milepost_collective_duration_seconds",
            "Time ranks spent in collectives (per rank and call), by op and group",
            labels=labels,
        )
        nbytes = CounterMetricFamily(
            "milepost_collective_bytes",
            "Bytes passed to collectives (the nccl-tests size S, summed over ranks and calls)",
            labels=labels,
        )
        algbw = GaugeMetricFamily(
            "milepost_collective_algbw_bytes_per_second",
            "Algorithm bandwidth (bytes / time) of recent collectives, by op and group",
            labels=labels,
        )
        busbw = GaugeMetricFamily(
            "milepost_collective_busbw_bytes_per_second",
            "Bus bandwidth of recent collectives (algbw x nccl-tests factor), by op and group",
            labels=labels,
        )
        with self._lock:
            for (op, group), agg in sorted(self._aggs.items()):
                cum, buckets = 0, []
                for bound, n in zip((*DURATION_BUCKETS, math.inf), agg.buckets, strict=True):
                    cum += n
                    buckets.append(("+Inf" if bound == math.inf else _fmt(bound), float(cum)))
                dur.add_metric([op, group], buckets, agg.seconds)
                nbytes.add_metric([op, group], float(agg.bytes))
                if agg.algbw is not None:
                    algbw.add_metric([op, group], agg.algbw)
                    busbw.add_metric([op, group], agg.algbw * busbw_factor(op, agg.world))
        yield from (dur, nbytes, algbw, busbw)


def _fmt(bound: float) -> str:
    return repr(float(bound))


def _finite(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return 0.0
    return f if math.isfinite(f) else 0.0
