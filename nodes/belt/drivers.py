"""Valve drivers: what carries a command's datagram (nodes.belt.datagram) to the valve bar.

Drivers share one small interface: Driver(address, key), send(command) and close(). `udp` sends the
datagram to a controller; `sim` sends the same datagram to the valve-bar
simulator node (nodes.valve_sim), which records what the air hit. A new
driver (a fieldbus, say) is one class here and one entry in DRIVERS.
"""

from __future__ import annotations

import socket

from sortline.nodes.belt.datagram import Command, encode
from sortline.pipeline.config import host_port


class UdpDriver:
    """Datagrams to a valve controller (or to the simulator: the `sim` driver is this, aimed at it),
    each authenticated with the controller's key."""

    def __init__(self, address: str, key: bytes):
        self.address = host_port(address)
        self.key = key
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(self, command: Command) -> None:
        self.sock.sendto(encode(command, self.key), self.address)

    def close(self) -> None:
        self.sock.close()


DRIVERS = {"udp": UdpDriver, "sim": UdpDriver}
