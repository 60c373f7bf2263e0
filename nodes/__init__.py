"""The node kinds a configuration can name, imported only when used.

Each kind is one module; its class declares ports, a Params model and a
compute step (see pipeline.node).
"""

from importlib import import_module

KINDS = {
    "pattern": "nodes.pattern:PatternSource",
    "relay": "nodes.relay:Relay",
    "sink": "nodes.sink:Sink",
    "simulate": "nodes.simulate:Simulate",
    "infer": "nodes.infer:Infer",
}


def node_class(kind: str):
    module, _, cls = KINDS[kind].partition(":")
    return getattr(import_module(module), cls)
