"""Telling systemd how a node is doing (the sd_notify protocol).

Under a `Type=notify` unit systemd hands the node a datagram socket in
NOTIFY_SOCKET and, with `WatchdogSec=`, the watchdog period in WATCHDOG_USEC.
The runner says READY=1 once setup has succeeded (camera open, calibration
and model loaded), WATCHDOG=1 from its main loop only (a stuck loop stops the
pings, and systemd restarts the node), STATUS= with the node's rates, and
STOPPING=1 when it begins to stop. Outside systemd every call does nothing.
"""

from __future__ import annotations

import os

import sdnotify

from sortline.pipeline import metrics


class Notifier:
    def __init__(self):
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._sd = sdnotify.SystemdNotifier() if self.enabled else None
        if self._sd is not None and self._sd.socket is not None:
            # A full socket queue must cost a status line, never stall the loop (sdnotify drops the error).
            self._sd.socket.setblocking(False)
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        # The watchdog is ours only when no other pid is named (systemd sets it to the main pid).
        ours = self.enabled and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        # The runner beats at least this often: twice the rate systemd needs, as sd_watchdog_enabled(3) advises.
        self.watchdog_every_s = int(usec) / 2e6 if ours else None
        self._stopping = False

    def _send(self, text: str) -> None:
        if self._sd is not None:
            self._sd.notify(text)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def alive(self, status: str) -> None:
        """Each heartbeat of the main loop: the watchdog ping and the current status."""
        if self._stopping:
            return  # the last beats of a stopping node are for the supervisor only
        ping = "WATCHDOG=1\n" if self.watchdog_every_s is not None else ""
        self._send(f"{ping}STATUS={status}")

    def stopping(self) -> None:
        self._stopping = True
        self._send("STOPPING=1\nSTATUS=stopping")


def status_line(now: dict, before: dict, dt: float, node_status: dict) -> str:
    """One line for `systemctl status`: message rates, losses, the node's own figures."""
    rate_in = metrics.rate(now, before, dt, 'direction="in"')
    rate_out = metrics.rate(now, before, dt, 'direction="out"')
    drops = metrics.total(now, "sortline_edge_drops_total")
    bad = metrics.total(now, "sortline_malformed_messages_total")
    extra = "".join(f", {k}={v}" for k, v in node_status.items())
    return f"in {rate_in:.1f}/s, out {rate_out:.1f}/s, {drops:.0f} dropped, {bad:.0f} malformed{extra}"
