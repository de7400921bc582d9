"""The dashboard's charts (Altair / Vega-Lite), each a pure function of API data to a chart.

Frames stay small on purpose: a chart update is a full re-render in the browser, so the
heatmap shows one page of ranks and the all-ranks view is per-step aggregates.
"""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd

CURVES = ("reward_mean", "loss", "kl", "grad_norm", "tokens_per_s")
HEATMAP_COLUMNS = 50  # at most this many step columns in the heatmap
STAGE_ORDER = ["fault", "detected", "attempt ended", "restarted", "resume verified", "first step"]


def step_frame(steps: list[dict[str, Any]]) -> pd.DataFrame:
    """Step records as columns, with throughput (rollout + train tokens per second of step)."""
    if not steps:
        return pd.DataFrame(columns=["step", *CURVES])
    df = pd.DataFrame(steps)
    for col in ("reward_mean", "loss", "kl", "grad_norm", "rollout_tokens", "train_tokens", "step_s"):
        if col not in df:
            df[col] = float("nan")
    step_s = df["step_s"].where(df["step_s"] > 0)
    df["tokens_per_s"] = (df["rollout_tokens"].fillna(0) + df["train_tokens"].fillna(0)) / step_s
    return df


def curves(steps: list[dict[str, Any]], fields: tuple[str, ...] = CURVES) -> alt.Chart:
    df = step_frame(steps)
    long = df.melt(id_vars=["step"], value_vars=[f for f in fields if f in df], var_name="metric")
    return (
        alt.Chart(long)
        .mark_line(point=len(df) < 60)
        .encode(
            x=alt.X("step:Q", title="step"),
            y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
            tooltip=["step:Q", "metric:N", alt.Tooltip("value:Q", format=".4g")],
        )
        .properties(height=140, width=280)
        .facet(facet=alt.Facet("metric:N", title=None), columns=3)
        .resolve_scale(y="independent")
    )


def goodput_bars(goodput: dict[str, Any]) -> alt.Chart:
    badput = goodput.get("badput") or {}
    rows = [{"bucket": "productive", "seconds": goodput.get("productive_s") or 0.0}]
    rows += [{"bucket": k.removesuffix("_s"), "seconds": v or 0.0} for k, v in badput.items()]
    return (
        alt.Chart(pd.DataFrame(rows))
        .mark_bar()
        .encode(
            x=alt.X("seconds:Q", title="seconds of wall time"),
            y=alt.Y("bucket:N", sort=None, title=None),
            color=alt.Color("bucket:N", legend=None),
            tooltip=["bucket:N", alt.Tooltip("seconds:Q", format=".1f")],
        )
        .properties(height=160)
    )


def heatmap(matrix: dict[str, Any], max_columns: int = HEATMAP_COLUMNS) -> alt.Chart:
    """One page of ranks x steps, colour = compute seconds; rows in the API's order (sorted there).

    More steps than ``max_columns`` are binned (mean of each bin, labelled by its first step):
    the browser draws every cell on each refresh, and 64 x 200 cells took seconds on a busy machine.
    """
    steps = list(matrix.get("steps", []))
    width = max(1, -(-len(steps) // max_columns))  # steps per column, rounded up
    rows = []
    for rank, values in zip(matrix.get("ranks", []), matrix.get("values", []), strict=False):
        for i in range(0, len(steps), width):
            cell = [v for v in values[i : i + width] if v is not None]
            if cell:
                rows.append({"rank": str(rank), "step": steps[i], "seconds": sum(cell) / len(cell)})
    order = [str(r) for r in matrix.get("ranks", [])]
    df = pd.DataFrame(rows, columns=["rank", "step", "seconds"])
    title = "step" if width == 1 else f"step (bins of {width})"
    return (
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=alt.X("step:O", title=title, axis=alt.Axis(labelOverlap=True)),
            y=alt.Y("rank:O", sort=order, title="rank"),
            color=alt.Color("seconds:Q", scale=alt.Scale(scheme="viridis"), title="compute s"),
            tooltip=["rank:N", "step:Q", alt.Tooltip("seconds:Q", format=".4f")],
        )
        .properties(height=max(120, min(12 * len(order), 800)))
    )


def aggregate_band(matrix: dict[str, Any]) -> alt.Chart:
    """Per-step min..max band with p50 and p90 over every rank: the 1024-rank view in one chart."""
    agg = matrix.get("aggregate") or {}
    df = pd.DataFrame(
        {"step": matrix.get("steps", []), **{k: agg.get(k, []) for k in ("min", "p50", "p90", "max")}}
    )
    base = alt.Chart(df).encode(x=alt.X("step:Q", title="step"))
    band = base.mark_area(opacity=0.25).encode(y=alt.Y("min:Q", title="compute s (all ranks)"), y2="max:Q")
    lines = (
        base.transform_fold(["p50", "p90"], as_=["stat", "seconds"])
        .mark_line()
        .encode(y="seconds:Q", color=alt.Color("stat:N", title=None))
    )
    return (band + lines).properties(height=180)


def collective_lines(series: list[dict[str, Any]], field: str, title: str) -> alt.Chart:
    df = pd.DataFrame(
        series, columns=["t", "op", "group", "count", "mean_s", "max_s", "busbw_bytes_per_second"]
    )
    df["time"] = pd.to_datetime(df["t"], unit="s")
    df["op / group"] = df["op"] + " / " + df["group"]
    return (
        alt.Chart(df)
        .mark_line(point=True)
        .encode(
            x=alt.X("time:T", title=None),
            y=alt.Y(f"{field}:Q", title=title),
            color=alt.Color("op / group:N"),
            tooltip=["op / group:N", "time:T", alt.Tooltip(f"{field}:Q", format=".4g"), "count:Q"],
        )
        .properties(height=200)
    )


def recovery_timeline(points: list[dict[str, Any]]) -> alt.Chart:
    """fault -> ... -> first step as marks on a time axis, each labelled with seconds since the fault."""
    df = pd.DataFrame(points, columns=["stage", "ts", "detail"])
    t0 = float(df["ts"].min()) if len(df) else 0.0
    df["seconds"] = df["ts"] - t0
    df["zero"] = 0.0
    base = alt.Chart(df).encode(
        x=alt.X("seconds:Q", title="seconds since the fault"),
        y=alt.Y("stage:N", sort=STAGE_ORDER, title=None),
    )
    return (
        base.mark_point(filled=True, size=120).encode(tooltip=["stage:N", "seconds:Q", "detail:N"])
        + base.mark_text(align="left", dx=8).encode(text=alt.Text("seconds:Q", format=".1f"))
        + base.mark_rule().encode(x="zero:Q", x2="seconds:Q")
    ).properties(height=200)


def waterfall(spans: list[dict[str, Any]]) -> alt.Chart:
    """A trace's spans as bars on one time axis, one row per span, coloured by process."""
    rows = []
    t0 = min((float(s["start_ts"]) for s in spans), default=0.0)
    for s in sorted(spans, key=lambda s: float(s["start_ts"])):
        res = s.get("resource") or {}
        proc = (
            res.get("service.instance.id")
            or f"{res.get('milepost.role', '?')}-{res.get('milepost.rank', '?')}"
        )
        rows.append(
            {
                "span": f"{s['name']} · {str(s['span_id'])[:6]}",
                "process": str(proc),
                "start": float(s["start_ts"]) - t0,
                "end": float(s["end_ts"]) - t0,
                "ms": float(s["duration_s"]) * 1000,
            }
        )
    df = pd.DataFrame(rows, columns=["span", "process", "start", "end", "ms"])
    return (
        alt.Chart(df)
        .mark_bar()
        .encode(
            x=alt.X("start:Q", title="seconds since the trace began"),
            x2="end:Q",
            y=alt.Y("span:N", sort=list(df["span"]), title=None, axis=alt.Axis(labelLimit=260)),
            color=alt.Color("process:N"),
            tooltip=["span:N", "process:N", alt.Tooltip("ms:Q", format=".1f")],
        )
        .properties(height=max(120, min(18 * len(df), 900)))
    )


def checkpoint_timeline(ckpts: list[dict[str, Any]]) -> alt.Chart:
    df = pd.DataFrame(ckpts, columns=["step", "status", "committed_at", "size_bytes", "attempt"])
    df = df[df["committed_at"].notna()].copy()
    df["time"] = pd.to_datetime(df["committed_at"], unit="s")
    df["MiB"] = df["size_bytes"].fillna(0) / 2**20
    return (
        alt.Chart(df)
        .mark_circle(size=90)
        .encode(
            x=alt.X("time:T", title=None),
            y=alt.Y("step:Q"),
            color=alt.Color("status:N"),
            size=alt.Size("MiB:Q", title="size MiB"),
            tooltip=["step:Q", "status:N", "time:T", alt.Tooltip("MiB:Q", format=".2f"), "attempt:Q"],
        )
        .properties(height=200)
    )


def stall_bars(steps: list[dict[str, Any]]) -> alt.Chart:
    rows = [
        {"step": s["step"], "stall_s": (s.get("phases") or {}).get("checkpoint")}
        for s in steps
        if (s.get("phases") or {}).get("checkpoint") is not None
    ]
    df = pd.DataFrame(rows, columns=["step", "stall_s"])
    return (
        alt.Chart(df)
        .mark_bar()
        .encode(
            x=alt.X("step:O"), y=alt.Y("stall_s:Q", title="save stall s"), tooltip=["step:Q", "stall_s:Q"]
        )
        .properties(height=160)
    )
