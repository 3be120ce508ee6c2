"""`quantfw <command> --help`: the command's page from its data (quantfw/cli/commands.py), option
defaults read from the recipe composed as the command would compose it."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from quantfw.cli.commands import Command

GROUPS = ("scheme", "format", "model", "backend", "engine")


def _default(cfg: DictConfig, key: str) -> str:
    value = OmegaConf.select(cfg, key, default=None)
    if key in GROUPS:
        return (
            "null"
            if value is None
            else str(value.get("name", value) if isinstance(value, DictConfig) else value)
        )
    if isinstance(value, (DictConfig, ListConfig)):
        return str(OmegaConf.to_container(value)).replace(" ", "")
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def page(name: str, cmd: Command, recipe: str, overrides: Sequence[str], dirs: Sequence[str]) -> str:
    from quantfw.config.compose import compose

    cfg = compose(recipe, overrides, dirs)
    lines = [
        f"usage: quantfw {name} {' '.join(r.split(':', 1)[0] for r in cmd.required)}"
        f"{' ' if cmd.required else ''}[recipe=NAME] [--config-dir DIR] [key=value ...]",
        "",
        cmd.what,
        "",
    ]
    if cmd.required:
        lines.append("required:")
        lines += [f"  {r.split(':', 1)[0]:<26} {r.split(':', 1)[1].strip()}" for r in cmd.required]
    if cmd.options:
        lines.append(f"options (defaults of recipe '{recipe}'{' with your overrides' if overrides else ''}):")
        width = max(len(f"{k}={_default(cfg, k)}") for k, _ in cmd.options)
        for key, text in cmd.options:
            lines.append(f"  {f'{key}={_default(cfg, key)}':<{max(width, 26)}} {text}")
    lines.append("examples:")
    lines += [f"  quantfw {e}" for e in cmd.examples]
    lines += [
        f"docs: {cmd.docs}",
        "",
        "Hydra: --cfg job prints the composed config, --hydra-help Hydra's own flags; `quantfw --help` lists the commands.",
    ]
    return "\n".join(lines)
