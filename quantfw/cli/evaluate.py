"""`quantfw eval checkpoint=DIR reference=DIR [tokens=N] [out=FILE.json]`: per-layer error vs float."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from quantfw.cli.user_overrides import recipe_and_overrides
from quantfw.errors import ConfigError
from quantfw.eval.checkpoint import evaluate_checkpoint, format_rows


def run(cfg: DictConfig) -> list[dict]:
    if not cfg.checkpoint or not cfg.reference:
        raise ConfigError("eval needs checkpoint=DIR (quantized) and reference=DIR (float)")
    recipe, overrides = recipe_and_overrides()
    rows = evaluate_checkpoint(cfg.checkpoint, cfg.reference, cfg.tokens, cfg.seed, recipe, overrides)
    print(format_rows(rows))
    if cfg.out:
        Path(cfg.out).write_text(
            json.dumps(
                {"checkpoint": str(cfg.checkpoint), "reference": str(cfg.reference), "layers": rows}, indent=2
            )
            + "\n"
        )
    return rows
