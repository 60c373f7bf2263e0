"""What the line's control system sees of a running graph: state, node health, counters, alarms.

Made by the supervisor from the heartbeats it reads anyway (each carries the
node's metrics), served by the OPC UA server (pipeline.opcua, docs/plc.md).
Every figure is a node's own Prometheus counter, summed over the node's
processes (a restart loses nothing); nothing is estimated here.
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass

from sortline.pipeline.config import Settings

STATES = ("starting", "ready", "running", "fault", "stopped")
RUNNING_WITHIN_S = 2.0   # the belt moved this recently: running, else ready
LATE_WINDOW_S = 10.0     # late commands within this window keep the LateCommands alarm active
_LABELS = re.compile(r'(\w+)="([^"]*)"')

# name: (severity 1..1000, as OPC UA alarms have it, what it means)
ALARMS = {
    "CameraLost": (800, "a camera (a source node) is down or reports its device lost"),
    "LateCommands": (700, "valve commands missed their deadline"),
    "Drops": (500, "the graph drops messages above opcua.drops_alarm_per_s"),
    "ValveControllerSilent": (900, "the valve commands do not go out: the ejector is down, its driver fails, "
                                   "or objects decided for ejection got no command"),
}


@dataclass
class Condition:
    active: bool
    message: str


def by_label(samples: dict[str, float], name: str, label: str) -> dict[str, float]:
    """The samples of counter `name` summed by one label's value."""
    out: dict[str, float] = {}
    for key, value in samples.items():
        if key.split("{", 1)[0] != name:
            continue
        labels = dict(_LABELS.findall(key))
        if label in labels:
            out[labels[label]] = out.get(labels[label], 0.0) + value
    return out


def summed(samples: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, value in samples.items():
        if key.split("{", 1)[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += value
    return total


class MachineView:
    """Made again from the supervisor's children on every turn of its loop; keeps the few seconds of
    counters the alarms look back on."""

    def __init__(self, settings: Settings, sources: set[str]):
        self.settings = settings
        self.sources = sources
        self.window_s = max(LATE_WINDOW_S, settings.opcua.valve_silent_s) + 1.0
        self.past: deque[tuple[float, dict[str, float]]] = deque()
        self.belt_moved = 0.0
        self.position = 0

    def update(self, phase: str, children: dict, position: int, now: float | None = None) -> dict:
        """phase: starting, up (every node started) or stopping, from the supervisor. children: name -> Child."""
        now = time.monotonic() if now is None else now
        timeout = self.settings.supervisor.heartbeat_timeout_s
        nodes, totals = {}, {}
        for name, c in children.items():
            alive = c.state == "running" and c.last_beat > 0 and now - c.last_beat < timeout
            nodes[name] = {"alive": alive, "state": c.state, "restarts": c.restarts, "last_error": c.last_error}
            totals[name] = c.totals()
        merged: dict[str, float] = {}
        for samples in totals.values():
            for k, v in samples.items():
                merged[k] = merged.get(k, 0.0) + v
        if position > self.position:
            self.position, self.belt_moved = position, now
        counters = {
            "late": summed(merged, "sortline_ejector_late_total"),
            "drops": summed(merged, "sortline_edge_drops_total"),
            "commands": summed(merged, "sortline_valve_commands_total"),
            "decided": summed(merged, "sortline_objects_total", decision="eject"),
            "driver_errors": summed(merged, "sortline_valve_driver_errors_total"),
        }
        self.past.append((now, counters))
        while self.past and now - self.past[0][0] > self.window_s:
            self.past.popleft()

        if phase == "starting":
            state = "starting"
        elif phase == "stopping":
            state = "stopped"
        elif any(n["state"] in ("waiting", "failed") or (n["state"] == "running" and not n["alive"])
                 for n in nodes.values()):
            state = "fault"
        else:
            state = "running" if now - self.belt_moved < RUNNING_WITHIN_S else "ready"
        return {
            "state": state, "nodes": nodes, "position": self.position,
            "objects": by_label(merged, "sortline_objects_total", "cls"),
            "ejections": by_label(merged, "sortline_ejections_total", "cls"),
            "late": counters["late"], "drops": counters["drops"], "commands": counters["commands"],
            "alarms": self._alarms(phase, nodes, totals, counters, now),
        }

    def _since(self, seconds: float, now: float) -> dict[str, float]:
        """The counters as they were `seconds` ago (the oldest kept, if the run is younger)."""
        old = self.past[0][1]
        for t, c in self.past:
            if now - t <= seconds:
                return old
            old = c
        return old

    def _alarms(self, phase: str, nodes: dict, totals: dict, now_counts: dict, now: float) -> dict[str, Condition]:
        started = phase == "up"
        lost = [n for n in self.sources if started and nodes[n]["state"] != "finished" and not nodes[n]["alive"]]
        lost += [cam for samples in totals.values() for cam, v in
                 by_label(samples, "sortline_camera_connected", "camera").items() if v == 0]
        late = now_counts["late"] - self._since(LATE_WINDOW_S, now)["late"]
        # Drops per second over the last few seconds (a full window once the run is that old).
        t0, c0 = next(((t, c) for t, c in self.past if now - t <= 5.0), (now, now_counts))
        drop_rate = (now_counts["drops"] - c0["drops"]) / (now - t0) if now > t0 else 0.0
        silent_s = self.settings.opcua.valve_silent_s
        before = self._since(silent_s, now)
        senders = [n for n, samples in totals.items() if any(k.startswith("sortline_valve_commands_total")
                                                             for k in samples)]
        down = [n for n in senders if started and not nodes[n]["alive"] and nodes[n]["state"] != "finished"]
        errors = now_counts["driver_errors"] - before["driver_errors"]
        unsent = (now_counts["decided"] > before["decided"] and now_counts["commands"] == before["commands"]
                  and now - self.past[0][0] >= silent_s)
        why = ([f"{', '.join(down)} down"] if down else []) + ([f"{errors:.0f} commands the driver could not send"]
                                                                if errors else [])
        if unsent:
            why.append(f"objects decided for ejection, no command sent for {silent_s:g} s")
        return {
            "CameraLost": Condition(bool(lost), f"camera lost: {', '.join(lost)}" if lost else ""),
            "LateCommands": Condition(late > 0, f"{late:.0f} valve commands late in the last {LATE_WINDOW_S:g} s"
                                      if late > 0 else ""),
            "Drops": Condition(drop_rate > self.settings.opcua.drops_alarm_per_s,
                               f"{drop_rate:.1f} messages dropped a second (alarm above "
                               f"{self.settings.opcua.drops_alarm_per_s:g})"
                               if drop_rate > self.settings.opcua.drops_alarm_per_s else ""),
            "ValveControllerSilent": Condition(bool(why), "valve controller silent: " + "; ".join(why) if why else ""),
        }
