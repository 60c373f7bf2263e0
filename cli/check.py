"""`sortline check`: validate a configuration and print the figures derived from it."""

from __future__ import annotations

from sortline.cli import common
from sortline.pipeline.config import ConfigError


def check(args) -> int:
    from sortline.pipeline.graph import edges, open_edges, topo_order
    from sortline.pipeline.metrics import port_problems

    settings = common.load(args.config)
    # What the supervisor checks at start-up too; a port its own node serves (the service running) is fine.
    problems = port_problems(settings, ours_running_ok=True)
    if problems:
        return common.config_errors(ConfigError([f"{args.config}: {line}" for line in problems]))
    print(f"{args.config}: valid (profile {settings.profile})")
    for cam in ("rgb", "hsi"):
        print(f"  {cam} line rate: {settings.line_rate_hz(cam):.0f} lines/s at {settings.belt.speed_m_s:g} m/s")
    print(f"  RGB:HSI ratio: {settings.hsi_ratio}")
    print(f"  latency budget: {settings.budget_derivation()}")
    print(f"  recipe: ejects {', '.join(settings.recipe.targets)}, priority {settings.recipe.priority}")
    print(f"  runtime directory: {settings.runtime_dir()}")
    print(f"  nodes (data-flow order): {', '.join(topo_order(settings))}")
    for e in edges(settings):
        print(f"  edge {e.name}: {e.policy}, {'shared memory' if e.shm else 'inline'}, {e.address}")
    for line in open_edges(settings):
        print(f"  WARNING: {line}")
    if common.nodes_of_kind(settings, "infer"):
        # The model is opened as the infer node opens it: a file cut short, made for other strips or
        # without a class the recipe names is found here, not at the first start of the line.
        from sortline.nodes.infer import open_model

        try:
            backend, unavailable = open_model(settings, settings.model.device)
        except ConfigError as exc:
            return common.config_errors(ConfigError([f"{args.config}: {line}" for line in exc.lines]))
        print(f"  model: {settings.model.path} ({backend.model_hash}) on {backend.name}, classes "
              f"{', '.join(backend.classes[1:])}")
        if unavailable:
            print(f"  WARNING: model.backend = {settings.model.backend!r} cannot run here ({unavailable}): "
                  "the infer node will run the ONNX file on the CPU")
        backend.close()
    return 0


def add(sub) -> None:
    p = sub.add_parser("check", help="validate a configuration and print the figures derived from it",
                       description="Validate a configuration; print line rates, the latency budget and "
                       "its derivation, the recipe, and the graph's edges.")
    common.add_config(p)
    p.set_defaults(func=check)
