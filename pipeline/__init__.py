"""The sortline runtime shared by every node: messages, transport, nodes, config, supervisor."""
