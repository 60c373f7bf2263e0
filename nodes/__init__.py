"""sortline's node kinds, one module each, and the streams between them.

Each kind's class declares its ports with their payloads (`streams`), a
Params model and a compute step (see sortline.pipeline.node). The kinds are
registered as entry points of the group `sortline.nodes` (pyproject.toml);
a configuration names them by those names. `belt` holds what the nodes that
act on the belt share (encoder track, valve-bar geometry, valve datagram and
drivers).
"""
