"""`quantfw check checkpoint=DIR [recipe overrides]`: one conformance report, exit 2 if anything is off.

The reader collects every index/shard inconsistency instead of stopping at the first, so the
report lists them all with the missing MoE layers, wrong tensors and out-of-range values."""

from __future__ import annotations

from omegaconf import DictConfig

from quantfw.cli.user_overrides import recipe_and_overrides
from quantfw.config.variants import running_config_dirs
from quantfw.errors import CheckpointError, ConfigError
from quantfw.io.loader import check, open_checkpoint


def run(cfg: DictConfig) -> list[str]:
    if not cfg.checkpoint:
        raise ConfigError("check needs checkpoint=DIR")
    recipe, overrides = recipe_and_overrides()
    op = open_checkpoint(cfg.checkpoint, recipe, overrides, collect=True, config_dirs=running_config_dirs())
    problems = check(op)
    layers = list(op.prefixes)
    head = (
        f"{op.reader.folder}: scheme {op.scheme.name} {dict(op.scheme.flags)}, format {op.fmt.name}, "
        f"{len(layers)} MoE layer(s) {layers}, {op.model.num_experts} experts"
    )
    print(head)
    if op.layer_overrides:  # per-layer scheme choices (config/layer_choice.py)
        from quantfw.config.layer_choice import by_scheme, ranges_text

        chosen = by_scheme(op.schemes())
        print(
            "  per-layer schemes: " + "; ".join(f"layers {ranges_text(ls)}: {n}" for n, ls in chosen.items())
        )
    for p in problems:
        print(f"  {p}")
    if cfg.get("engine") is not None:  # engine=NAME: that engine's rules too (docs/engines.md)
        from quantfw.engines.commands import report_check

        report_check(cfg, op)
    if problems:
        raise CheckpointError(f"{op.reader.folder}: {len(problems)} problem(s) (listed above)")
    print("  OK: every routed-expert tensor matches the declared layout")
    return problems
