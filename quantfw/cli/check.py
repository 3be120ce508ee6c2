"""`quantfw check checkpoint=DIR [engine=NAME tp_size=T ep_size=E] [recipe overrides]`: one
conformance report, exit 2 if anything is off. With `engine`, the report adds every rule of that
engine's profile the checkpoint breaks (quantfw.engines): exit 2 if the engine would refuse it,
0 with the warnings when it would only compute differently."""

from __future__ import annotations

from omegaconf import DictConfig

from quantfw.cli.user_overrides import recipe_and_overrides
from quantfw.errors import CheckpointError, ConfigError
from quantfw.io.loader import check, open_checkpoint


def run(cfg: DictConfig) -> list[str]:
    if not cfg.checkpoint:
        raise ConfigError("check needs checkpoint=DIR")
    recipe, overrides = recipe_and_overrides()
    op = open_checkpoint(cfg.checkpoint, recipe, overrides)
    problems = check(op)
    layers = list(op.prefixes)
    head = (
        f"{op.reader.folder}: scheme {op.scheme.name} {dict(op.scheme.flags)}, format {op.fmt.name}, "
        f"{len(layers)} MoE layer(s) {layers}, {op.model.num_experts} experts"
    )
    print(head)
    for p in problems:
        print(f"  {p}")
    if cfg.get("engine") is not None:
        from quantfw.engines.profile import from_config
        from quantfw.engines.report import engine_report, refused

        engine = from_config(cfg.engine)
        findings = engine_report(op, engine, cfg.tp_size, cfg.ep_size)
        for f in findings:
            print(f"  {f.line()}")
        if refused(findings):
            raise CheckpointError(f"{op.reader.folder}: engine {engine.name} would refuse this checkpoint (listed above)")
        print(f"  engine {engine.name} (tp {cfg.tp_size}, ep {cfg.ep_size}): loads it; {len(findings)} silent difference(s)")
    if problems:
        raise CheckpointError(f"{op.reader.folder}: {len(problems)} problem(s) (listed above)")
    print("  OK: every routed-expert tensor matches the declared layout")
    return problems
