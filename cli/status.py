"""`sortline status`: every node of the graph at a glance, from its Prometheus endpoint.

Why the endpoints and not the supervisor's heartbeats: on the machine the
nodes run as systemd units, with no supervisor, but each serves its metrics
on `metrics.port_base` + its place in data-flow order, the same figures
Prometheus scrapes and the dashboard draws. So this command reads what
Prometheus reads, the same way under systemd and under `sortline run`.
Two scrapes `interval` seconds apart give the rates and the latency of that
window.
"""

from __future__ import annotations

import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from sortline.pipeline import metrics
from sortline.cli import common
from sortline.pipeline.config import EX_CONFIG, Settings
from sortline.pipeline.graph import topo_order

COLUMNS = ("node", "state", "in/s", "out/s", "lines/s", "drops", "malformed", "refused", "e2e p50", "e2e p99",
           "details")


def scrape(bind: str, port: int, timeout: float = 2.0) -> dict[str, float] | None:
    """A node's samples keyed as metrics.snapshot keys them (buckets too); None: not answering."""
    host = "127.0.0.1" if bind in ("0.0.0.0", "") else bind
    try:
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout).read().decode()
    except OSError:
        return None
    return {metrics.key(s.name, s.labels): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def quantile(now: dict, before: dict, name: str, q: float) -> float | None:
    """The upper bound of the histogram bucket holding quantile q of what was observed
    between two scrapes (None: nothing observed)."""
    counts: dict[float, float] = {}
    for k, v in now.items():
        if k.startswith(f"{name}_bucket{{"):
            le = float(k.split('le="')[1].split('"')[0])
            counts[le] = counts.get(le, 0.0) + v - before.get(k, 0.0)
    total = counts.get(float("inf"), 0.0)
    if total <= 0:
        return None
    return next(le for le in sorted(counts) if counts[le] >= q * total)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return "> 2 s" if seconds == float("inf") else f"<= {seconds * 1000:g} ms"


def details(now: dict, before: dict, dt: float) -> str:
    """What some nodes have of their own: cameras, ejectors."""
    out = []
    if any(k.startswith("sortline_camera_connected") for k in now):
        out.append(f"camera {'connected' if metrics.total(now, 'sortline_camera_connected') else 'LOST'}")
        out.append(f"lost frames {metrics.total(now, 'sortline_camera_lost_frames_total'):.0f}")
    if any(k.startswith("sortline_ejections_total") for k in now):
        out.append(f"ejections/s {metrics.rate(now, before, dt, '', 'sortline_ejections_total'):.1f}")
        out.append(f"late {metrics.total(now, 'sortline_ejector_late_total'):.0f}")
        decision = quantile(now, before, "sortline_ejector_decision_seconds", 0.99)
        if decision is not None:
            out.append(f"decision p99 {_ms(decision)}")
    return ", ".join(out)


def rows(settings: Settings, interval: float) -> list[tuple[str, ...]]:
    order = topo_order(settings)
    ports = {name: metrics.port_of(settings, name) for name in order}
    first = {name: scrape(settings.metrics.bind, port) for name, port in ports.items()}
    t0 = time.monotonic()
    time.sleep(interval)
    second = {name: scrape(settings.metrics.bind, port) for name, port in ports.items()}
    dt = time.monotonic() - t0
    table = []
    for name in order:
        now, before = second[name], first[name] or {}
        if now is None:
            table.append((name, "down", *["-"] * (len(COLUMNS) - 3), f"no answer on port {ports[name]}"))
            continue
        up = metrics.total(now, "sortline_node_up")
        rate_in = metrics.rate(now, before, dt, 'direction="in"')
        rate_out = metrics.rate(now, before, dt, 'direction="out"')
        table.append((
            name, "up" if up else "starting", f"{rate_in:.1f}", f"{rate_out:.1f}",
            f"{metrics.rate(now, before, dt, '', 'sortline_lines_total'):.0f}",
            f"{metrics.total(now, 'sortline_edge_drops_total'):.0f}",
            f"{metrics.total(now, 'sortline_malformed_messages_total'):.0f}",
            f"{metrics.total(now, 'sortline_auth_refused_total'):.0f}",
            _ms(quantile(now, before, "sortline_latency_seconds", 0.5)),
            _ms(quantile(now, before, "sortline_latency_seconds", 0.99)),
            details(now, before, dt),
        ))
    return table


def render(table: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [COLUMNS, *table]) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [COLUMNS, *table])


def status(args) -> int:
    settings = common.load(args.config)
    if not settings.metrics.port_base:
        print(f"sortline: status: metrics.port_base is 0 in {args.config}: the nodes serve no metrics to read "
              f"(set it there, or SORTLINE_METRICS__PORT_BASE=9300 for both `sortline run` and this)", file=sys.stderr)
        return EX_CONFIG
    table = rows(settings, args.interval)
    print(render(table))
    return 3 if any(row[1] == "down" for row in table) else 0  # as `systemctl status` does for a stopped unit


def add(sub) -> None:
    p = sub.add_parser("status", help="every node's rates, losses and latency at a glance (from their metrics)",
                       description="Read each node's Prometheus endpoint (metrics.port_base + its place in "
                       "data-flow order) twice, --interval apart, and print a table: state, messages in and "
                       "out per second, camera lines per second, drops, malformed messages, refused "
                       "connections, end-to-end latency (bucket bounds) and what cameras and ejectors report. "
                       "Exit code 3: a node does not answer.")
    common.add_config(p)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between the two readings (default 1)")
    p.set_defaults(func=status)
