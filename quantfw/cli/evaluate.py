"""`quantfw eval checkpoint=DIR reference=DIR [tokens=N] [out=FILE.json] [eval.plot=FILE.png]
[eval.perplexity=true] [eval.table=FILE.md] [engine=NAME]`: error of the quantized MoE layers vs float.

With `engine=NAME` the layers compute as that engine does for this checkpoint (its profile's
`plan`, docs/engines.md), so the error is the one its users see.

Per layer and per expert (eval.per_expert) rel_l2 / cosine / max_abs on synthetic tokens with
outlier channels; perplexity of the reference causal LM with its MoE blocks swapped for the
quantized layers (eval.perplexity). `out` gets the documented JSON (quantfw.eval.report) and one
comparison row per job; with `--multirun checkpoint=A,B out=F.json eval.table=T.md` all jobs land
in one table.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

from omegaconf import DictConfig

from quantfw.cli.user_overrides import recipe_and_overrides
from quantfw.engines.plan import plan_overrides
from quantfw.errors import ConfigError
from quantfw.eval import report
from quantfw.eval.checkpoint import checkpoint_perplexity, evaluate_checkpoint, format_rows
from quantfw.progress import quiet_transformers


def _provenance(folder: str) -> dict | None:
    """The quantfw block of the checkpoint's metadata (either style), if any."""
    from quantfw.io.metadata import quantfw_block

    return quantfw_block(Path(folder))


def run(cfg: DictConfig) -> dict:
    if not cfg.checkpoint or not cfg.reference:
        raise ConfigError("eval needs checkpoint=DIR (quantized) and reference=DIR (float)")
    if cfg.eval.table and not cfg.out:
        raise ConfigError("eval.table=FILE.md needs out=FILE.json (the table is rebuilt from its rows)")
    recipe, overrides = recipe_and_overrides()
    overrides = [o for o in overrides if not o.split("=", 1)[0].startswith(("eval.", "calibration."))]
    plan = []
    engine = None
    if cfg.get("engine") is not None:
        # Engine-faithful: the compute plan that engine runs for this checkpoint (its profile's plan).
        from quantfw.engines.plan import engine_open
        from quantfw.engines.profile import from_config

        engine = from_config(cfg.engine)
        _, plan = engine_open(cfg.checkpoint, engine, recipe, overrides)
        print(f"engine {engine.name}: plan overrides {plan or 'none'}", file=sys.stderr)
    layer_plan = None if engine is None else partial(plan_overrides, engine)  # per layer's scheme
    e = cfg.eval
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: the expert-parallel layers
        from quantfw.eval.parallel import run_parallel_eval

        return run_parallel_eval(cfg, recipe, overrides, _provenance(cfg.checkpoint) or {})
    rows = evaluate_checkpoint(
        cfg.checkpoint,
        cfg.reference,
        cfg.tokens,
        cfg.seed,
        recipe,
        overrides,
        per_expert=e.per_expert,
        progress=cfg.progress,
        layer_plan=layer_plan,
    )
    print(format_rows(rows))
    ppl = None
    if e.perplexity:
        quiet_transformers(cfg.progress)
        ppl = checkpoint_perplexity(
            cfg.checkpoint, cfg.reference, e.ppl_tokens, e.seq_len, cfg.seed, recipe, overrides, layer_plan
        )
        print(report.perplexity_line(ppl))
    prov = _provenance(cfg.checkpoint) or {}
    doc = {
        "schema": report.SCHEMA,
        "checkpoint": str(cfg.checkpoint),
        "reference": str(cfg.reference),
        "recipe_overrides": [*overrides, *plan],
        "tokens": int(cfg.tokens),
        "seed": int(cfg.seed),
        "layers": rows,
        "perplexity": ppl,
        "alpha_calibration": prov.get("alpha_calibration"),
        **({"engine": engine.name, "engine_plan": plan} if engine is not None else {}),
    }
    if cfg.out:
        doc = report.write_results(cfg.out, doc)
        if e.table:
            Path(e.table).parent.mkdir(parents=True, exist_ok=True)
            Path(e.table).write_text(report.markdown_table(doc["runs"]))
    if e.plot:
        print(f"plot: {report.plot(doc, e.plot)}", file=sys.stderr)
    return doc
