"""The node kinds a configuration can name, imported only when used.

Each kind is one module; its class declares ports, a Params model and a
compute step (see pipeline.node).
"""

from importlib import import_module

KINDS = {
    "acquire": "nodes.acquire.node:Acquire",
    "pattern": "nodes.pattern:PatternSource",
    "record": "nodes.record:Recorder",
    "relay": "nodes.relay:Relay",
    "replay": "nodes.replay:Replay",
    "sink": "nodes.sink:Sink",
    "simulate": "nodes.simulate:Simulate",
    "register": "nodes.register:Register",
    "oracle": "nodes.oracle:Oracle",
    "eject_plan": "nodes.eject_plan:EjectPlan",
    "ejector": "nodes.ejector:Ejector",
    "valve_sim": "nodes.valve_sim:ValveSim",
    "infer": "nodes.infer:Infer",
}


def node_class(kind: str):
    module, _, cls = KINDS[kind].partition(":")
    return getattr(import_module(module), cls)
