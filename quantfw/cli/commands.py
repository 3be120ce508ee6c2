"""The command table of `quantfw`: name -> (one-line help, module with `run(cfg)`).

Modules are imported only when their command runs, so optional extras stay optional.
"""

COMMANDS: dict[str, tuple[str, str]] = {
    "example": (
        "out=DIR [model=tiny_deepseek_v3|tiny_qwen3_moe|tiny_mixtral] [dtype=bf16|fp8]: a small float checkpoint to try",
        "quantfw.cli.example",
    ),
    "demo": (
        "the main job: quantize the recipe's layer with every scheme, compare with float",
        "quantfw.cli.demo",
    ),
    "plan": (
        "dry run on the meta device: parameters before/after post-load, model memory",
        "quantfw.cli.plan",
    ),
    "quantize": (
        "float HF checkpoint (input=DIR) -> quantized checkpoint (output=DIR) in the recipe's scheme/format",
        "quantfw.cli.quantize",
    ),
    "check": (
        "checkpoint=DIR: every missing/unexpected/wrong-shape/wrong-dtype expert tensor vs the declared layout",
        "quantfw.cli.check",
    ),
    "eval": (
        "checkpoint=DIR reference=DIR: per-layer error of the quantized MoE layers vs the float ones",
        "quantfw.cli.evaluate",
    ),
    "bench": (
        "forward latency per scheme and backend mode vs float baselines and the memory roofline; load time",
        "quantfw.cli.bench",
    ),
}
