"""The sortline runtime shared by every node: messages, ports, transport, nodes, graph, config, supervisor.

It imports nothing from sortline.nodes, sortline.models, sortline.calibration or
sortline.cli (an import-linter contract in the tests holds it to that).
"""
