"""milepost's Grafana dashboards as code, built with Grafana's own ``grafana-foundation-sdk`` builders.

Why that library: it is Grafana's generated SDK for its dashboard schema (the same types
Grafana's Go and TypeScript builders use), so a panel or field Grafana does not know fails
here, at build time, not in the browser. Five dashboards, each with a ``run_id`` variable
(single run, from ``label_values(milepost_steps_total, run_id)``): overview (progress,
learning, goodput and badput), ranks and collectives, incidents, GPUs, checkpoints. Every
query uses only families the daemon exports (``daemon.metrics``, ``daemon.collective_metrics``,
``daemon.gpu_metrics``); ``tests/integration/test_deploy_live.py`` runs each against a real
Prometheus scraping a real run. ``render()`` gives the JSON committed under
``deploy/grafana/dashboards/`` (``milepost grafana render`` writes it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from grafana_foundation_sdk.builders import common, stat, statetimeline, timeseries
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from .grafana_panels import SPECS, P, Q, Row

DATASOURCE_UID = "milepost-prometheus"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
TAGS = ["milepost"]


def _target(q: Q, ref: str) -> prom.Dataquery:
    t = prom.Dataquery().expr(q.expr).ref_id(ref).datasource(DATASOURCE)
    if q.legend:
        t = t.legend_format(q.legend)
    return t.instant() if q.instant else t.range()


def _panel(p: P, pid: int) -> Any:
    legend = (
        common.VizLegendOptions()
        .show_legend(True)
        .display_mode(cm.LegendDisplayMode.LIST)
        .placement(cm.LegendPlacement.BOTTOM)
    )
    b: Any
    if p.kind == "stat":
        reduce = common.ReduceDataOptions().calcs(["lastNotNull"]).values(False)
        b = stat.Panel().reduce_options(reduce).graph_mode(cm.BigValueGraphMode.AREA).height(4)
        if p.show_name:
            b = b.text_mode(cm.BigValueTextMode.NAME)
    elif p.kind == "state":
        b = statetimeline.Panel().legend(legend).show_value(cm.VisibilityMode.AUTO).fill_opacity(70).height(8)
    else:
        b = timeseries.Panel().legend(legend).line_width(1).fill_opacity(10).height(8)
    b = b.id(pid).title(p.title).datasource(DATASOURCE).unit(p.unit).span(p.width)
    if p.description:
        b = b.description(p.description)
    for i, q in enumerate(p.queries):
        b = b.with_target(_target(q, chr(ord("A") + i)))
    return b


def build(uid: str, title: str, description: str, rows: list[Row]) -> dm.Dashboard:
    """One dashboard through the SDK's builders."""
    run_var = (
        db.QueryVariable("run_id")
        .label("run")
        .datasource(DATASOURCE)
        .query("label_values(milepost_steps_total, run_id)")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_DESC)
    )
    d = (
        db.Dashboard(title)
        .uid(f"milepost-{uid}")
        .description(description)
        .tags(TAGS)
        .refresh("10s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .with_variable(run_var)
    )
    pid = 1
    for row_title, panels in rows:
        d = d.with_row(db.Row(row_title).id(pid))
        pid += 1
        for p in panels:
            d = d.with_panel(_panel(p, pid))
            pid += 1
    return d.build()


def dashboards() -> dict[str, dm.Dashboard]:
    """Every dashboard by file stem (``overview`` -> ``milepost-overview.json``)."""
    return {uid: build(uid, title, desc, rows) for uid, title, desc, rows in SPECS}


def to_json(d: dm.Dashboard) -> str:
    """The committed form: sorted keys, two-space indent, trailing newline."""
    return json.dumps(d, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def render() -> dict[str, str]:
    """File name -> JSON text, as committed under ``deploy/grafana/dashboards/``."""
    return {f"milepost-{uid}.json": to_json(d) for uid, d in dashboards().items()}


def queries(doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every target of a dashboard's JSON, rows included."""
    for panel in doc.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for t in inner.get("targets") or []:
                if t.get("expr"):
                    yield str(inner.get("title", "")), str(t["expr"])
