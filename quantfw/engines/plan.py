"""Engine-faithful compute: a profile's `plan` steps are scheme-flag overrides applied when the
checkpoint's detected flags match, so the generic MoE layer runs what that engine runs (e.g. a
clip checkpoint unclipped where the engine never applies alpha)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from quantfw.engines.profile import EngineProfile, load_profile
from quantfw.layout.expr import holds


def _value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def plan_overrides(engine: str | EngineProfile, flags: Mapping[str, Any]) -> list[str]:
    """`scheme.KEY=VALUE` overrides of every plan step whose `when` holds for these scheme flags."""
    profile = engine if isinstance(engine, EngineProfile) else load_profile(engine)
    env = {k: v for k, v in flags.items() if isinstance(v, (bool, int, float, str))}
    out: dict[str, str] = {}
    for i, step in enumerate(profile.plan):
        if holds(step.when, env, f"{profile.where}: plan[{i}].when"):
            out.update({f"scheme.{k}": _value(v) for k, v in step.flags.items()})
    return [f"{k}={v}" for k, v in out.items()]


def engine_open(
    checkpoint: str | Path, engine: str | EngineProfile, recipe: str = "default", overrides: Sequence[str] = ()
):
    """(opened checkpoint computing as `engine` does, the first MoE layer's plan overrides): each
    layer gets the plan of its own scheme (per-layer choices)."""
    from quantfw.io.loader import open_checkpoint

    profile = engine if isinstance(engine, EngineProfile) else load_profile(engine)
    extra = plan_overrides(profile, open_checkpoint(checkpoint, recipe, overrides).scheme.flags)
    op = open_checkpoint(checkpoint, recipe, overrides, layer_plan=lambda flags: plan_overrides(profile, flags))
    return op, extra


def load_engine_layer(
    checkpoint: str | Path,
    engine: str | EngineProfile,
    layer: int = -1,
    recipe: str = "default",
    overrides: Sequence[str] = (),
):
    """The MoE layer of `checkpoint` as `engine` computes it (layer -1: the first MoE layer)."""
    from quantfw.io.loader import load_layer

    op, _ = engine_open(checkpoint, engine, recipe, overrides)
    return load_layer(op, op.layer_index(layer))
