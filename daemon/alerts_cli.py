"""``milepost alerts``: list alerts, silence and unsilence them, send a receiver a test alert.

    milepost alerts list [--run-dir DIR] [--json]
    milepost alerts silence alertname=CollectiveHang rank=1 --for 2h [--comment TEXT] [--run-dir DIR]
    milepost alerts unsilence SILENCE_ID [--run-dir DIR]
    milepost alerts test --receiver NAME [--run-dir DIR]

All of them talk to the run's daemon (its API and token, found through the run dir); the
test alert goes out from the daemon, which holds the receivers' secrets.
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` -> seconds; ValueError naming the text."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--for {text!r}: expected a positive duration like 90s, 15m, 2h or 1d")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _ago(ts: float | None, now: float) -> str:
    return "-" if ts is None else f"{now - ts:.0f}s ago"


def _list(client: Any, as_json: bool) -> int:
    got = client.alerts()
    silences = client.silences()
    if as_json:
        print(json.dumps({**got, "silences": silences}, indent=2))
        return 0
    now = time.time()
    alerts = got["alerts"]
    if not alerts:
        print("no alerts")
    for a in alerts:
        labels = ",".join(
            f"{k}={v}" for k, v in sorted(a["labels"].items()) if k not in ("alertname", "severity")
        )
        muted = " silenced" if a["silenced_by"] else " inhibited" if a["inhibited_by"] else ""
        print(
            f"{a['status']:<9} {a['labels'].get('severity', ''):<8} {a['labels'].get('alertname', ''):<18} "
            f"since {_ago(a['active_since'], now):<10}{muted}  {labels}\n"
            f"          {a['annotations'].get('summary', '')}"
        )
    delivery = got["delivery"]
    for name, n in sorted(delivery["pending"].items()):
        print(f"receiver {name}: {n} notification(s) waiting")
    for name, why in sorted(delivery["held"].items()):
        print(f"receiver {name}: cannot send: {why}")
    for s in silences:
        if s["active"]:
            matchers = " ".join(f"{m['name']}{m['op']}{m['value']}" for m in s["matchers"])
            print(f"silence {s['id']}: {matchers} until {s['ends_at'] - now:.0f}s from now ({s['comment']})")
    return 0


def main_alerts(args: argparse.Namespace) -> int:
    from .client import DaemonClient, DaemonError

    try:
        client = DaemonClient.from_run_dir(Path(args.run_dir or "runs/tiny-grpo-cpu"), timeout_s=30.0)
        if args.alerts_cmd == "list":
            return _list(client, args.json)
        if args.alerts_cmd == "silence":
            sil = client.silence(
                args.matchers,
                parse_duration(args.duration),
                created_by=args.created_by or getpass.getuser(),
                comment=args.comment,
            )
            print(
                f"silence {sil['id']} until {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(sil['ends_at']))}"
            )
            return 0
        if args.alerts_cmd == "unsilence":
            client.unsilence(args.silence_id)
            print(f"silence {args.silence_id} expired")
            return 0
        res = client.test_receiver(args.receiver)
        print(f"receiver {res['receiver']}: {res['status']}; answered: {res['answer'] or '-'}")
        if res["reason"]:
            print(f"  reason: {res['reason']}")
        return 0 if res["status"] == "ok" else 1
    except (DaemonError, ValueError) as e:
        print(f"milepost alerts {args.alerts_cmd}: {e}", file=sys.stderr)
        return 1


def add_parser(sub: Any) -> None:
    a = sub.add_parser("alerts", help="list alerts, silence or unsilence them, test a receiver")
    cmds = a.add_subparsers(dest="alerts_cmd", required=True)
    ls = cmds.add_parser("list", help="alerts firing, pending and resolved; silences; delivery")
    ls.add_argument("--json", action="store_true")
    s = cmds.add_parser("silence", help="mute alerts whose labels match every matcher")
    s.add_argument("matchers", nargs="+", help="name=value, name!=value, name=~regex, name!~regex")
    s.add_argument("--for", dest="duration", default="1h", help="how long: 90s, 15m, 2h, 1d (default 1h)")
    s.add_argument("--comment", default="")
    s.add_argument("--created-by", default="")
    u = cmds.add_parser("unsilence", help="expire a silence now")
    u.add_argument("silence_id")
    t = cmds.add_parser("test", help="send a receiver a test alert and print what it answered")
    t.add_argument("--receiver", required=True)
    for p in (ls, s, u, t):
        p.add_argument("--run-dir", default=None)
    a.set_defaults(func=main_alerts)
