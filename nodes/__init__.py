"""The node kinds a configuration can name, imported only when used.

Each kind is one module; its class declares ports, a Params model and a
compute step (see pipeline.node).
"""

from importlib import import_module

KINDS = {
    "acquire": "nodes.acquire.node:Acquire",
    "pattern": "nodes.pattern:PatternSource",
    "relay": "nodes.relay:Relay",
    "sink": "nodes.sink:Sink",
}


def node_class(kind: str):
    module, _, cls = KINDS[kind].partition(":")
    return getattr(import_module(module), cls)
