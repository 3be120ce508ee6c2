"""The CLI side of engine profiles: `quantfw quantize ... engine=NAME` (the profile's defaults for
what to write, the engine's report on what was written) and `quantfw check ... engine=NAME`
(exit 2 if the engine would refuse the checkpoint, 0 with warnings for silent differences)."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from quantfw.engines.profile import from_config
from quantfw.engines.report import engine_report, refused
from quantfw.errors import CheckpointError, ConfigError


def quantize_linears(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """(targets, ignore) of the non-expert linears to write W8A8. With `engine` set and no
    `quantize.targets` of its own (recipe or command line), the profile's pair applies; a recipe's
    or user's targets win, with their ignore list."""
    targets, ignore = list(cfg.quantize.targets), list(cfg.quantize.ignore)
    profile = from_config(cfg.get("engine"))
    if profile is None:
        return targets, ignore
    q = profile.quantize
    if q is None:
        return targets, ignore
    if q.format != cfg.format.name:
        raise ConfigError(
            f"engine={profile.name} loads format={q.format}, found format={cfg.format.name} ({profile.where}: quantize.format)"
        )
    return (targets, ignore) if targets else (list(q.targets), list(q.ignore))


def report_output(cfg: DictConfig, out: str | Path) -> None:
    """Print the engine's findings on the written checkpoint; raise if the engine would refuse it."""
    profile = from_config(cfg.get("engine"))
    if profile is None:
        return
    from quantfw.io.loader import open_checkpoint

    op = open_checkpoint(out, proj_names=dict(cfg.model.proj_names))
    findings = engine_report(op, profile, cfg.tp_size, cfg.ep_size)
    for f in findings:
        print(f"quantfw quantize: {f.line()}", file=sys.stderr)
    if refused(findings):
        raise CheckpointError(f"{out}: written, but engine {profile.name} would refuse it (rules listed above)")
    if not findings:
        print(f"quantfw quantize: engine {profile.name}: every rule holds", file=sys.stderr)


def report_check(cfg: DictConfig, op) -> None:
    """`check engine=NAME tp_size=T ep_size=E`: one line per broken rule of the engine's profile."""
    profile = from_config(cfg.engine)
    findings = engine_report(op, profile, cfg.tp_size, cfg.ep_size)
    for f in findings:
        print(f"  {f.line()}")
    if refused(findings):
        raise CheckpointError(f"{op.reader.folder}: engine {profile.name} would refuse this checkpoint (listed above)")
    print(f"  engine {profile.name} (tp {cfg.tp_size}, ep {cfg.ep_size}): loads it; {len(findings)} silent difference(s)")
