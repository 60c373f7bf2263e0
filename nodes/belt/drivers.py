"""Valve drivers: what carries a command's datagram (nodes.belt.datagram) to the valve bar.

Drivers share one small interface: send(command) and close(). `udp` sends the
datagram to a controller; `sim` sends the same datagram to the valve-bar
simulator node (nodes.valve_sim), which records what the air hit. A new
driver (a fieldbus, say) is one class here and one entry in DRIVERS.
"""

from __future__ import annotations

import socket

from sortline.nodes.belt.datagram import Command, encode


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r}: expected HOST:PORT")
    return host, int(port)


class UdpDriver:
    """Datagrams to a valve controller (or to the simulator: the `sim` driver is this, aimed at it)."""

    def __init__(self, address: str):
        self.address = parse_address(address)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(self, command: Command) -> None:
        self.sock.sendto(encode(command), self.address)

    def close(self) -> None:
        self.sock.close()


DRIVERS = {"udp": UdpDriver, "sim": UdpDriver}
