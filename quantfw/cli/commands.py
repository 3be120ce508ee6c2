"""The command table of `quantfw`: name -> (one-line help, module with `run(cfg)`).

Modules are imported only when their command runs, so optional extras stay optional.
"""

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "the main job: quantize the recipe's layer with every scheme, compare with float",
        "quantfw.cli.demo",
    ),
    "plan": (
        "dry run on the meta device: parameters before/after post-load, model memory",
        "quantfw.cli.plan",
    ),
    "bench": (
        "forward latency per scheme and backend mode vs float baselines and the memory roofline; load time",
        "quantfw.cli.bench",
    ),
}
