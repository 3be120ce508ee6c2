"""`quantfw <command> [recipe=NAME] [--config-dir DIR] [key=value ...]`.

Every command is a Hydra app over the same recipes, so `--cfg job`, `--multirun` and
`--config-dir` (user recipe folders) work as in any Hydra program. Expected errors print one
line on stderr and exit 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

from quantfw.errors import QuantfwError

USAGE = """usage: quantfw <command> [recipe=NAME] [--config-dir DIR] [overrides ...] [--debug]

commands:
{commands}

Recipes: recipes/*.yaml (recipe=deepseek_v3_w4a8_clip); your own with --config-dir DIR.
Overrides: scheme=w4a8 scheme.group_size=0 scheme.activation_use_clip=true model=qwen3_30b_a3b ...
Hydra flags: --cfg job, --multirun (-m), --help for the composed config.
"""


def _commands() -> dict[str, tuple[str, str]]:
    from quantfw.cli.commands import COMMANDS

    return COMMANDS


def fail(command: str, message: str) -> None:
    print(f"quantfw {command}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _split_args(argv: list[str]):
    """Pull out recipe=NAME, --debug and user config dirs; keep the rest for Hydra."""
    recipe, debug, dirs, rest = "default", False, [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("recipe="):
            recipe = a.split("=", 1)[1]
        elif a == "--debug":
            debug = True
        elif a in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(argv[i + 1])
            rest += [a, argv[i + 1]]
            i += 1
        elif a.startswith("--config-dir="):
            dirs.append(a.split("=", 1)[1])
            rest.append(a)
        elif a in ("--config-name", "-cn"):
            fail("?", "use recipe=NAME instead of --config-name")
        else:
            rest.append(a)
        i += 1
    return recipe, debug, dirs, rest


def _is_sweep(rest: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in rest)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        listing = "\n".join(f"  {n:<10} {d}" for n, (d, _) in commands.items())
        print(USAGE.format(commands=listing))
        return
    command, argv = argv[0], argv[1:]
    if command not in commands:
        fail(command, f"unknown command '{command}' (available: {', '.join(commands)})")
    recipe, debug, dirs, rest = _split_args(argv)
    import importlib

    run = importlib.import_module(commands[command][1]).run

    from quantfw.config.compose import RECIPES_DIR, compose, searchpath_override
    from quantfw.config.schema import register_configs

    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    user_searchpath = [a for a in overrides if a.startswith("hydra.searchpath=")]
    extra_paths = []
    for a in user_searchpath:  # merge the user's search path with conf/ instead of replacing it
        extra_paths += [p.strip() for p in a.split("=", 1)[1].strip("[]").split(",") if p.strip()]
        rest.remove(a)
    # Validate before Hydra runs anything: one clear line for a bad override, and no recipe can
    # make Hydra import code. A sweep is checked with its swept keys left out (Hydra checks each job).
    sweep = _is_sweep(rest)
    checked = [a for a in overrides if a not in user_searchpath and not (sweep and "," in a.split("=", 1)[1])]
    if not (set(rest) & {"--help", "--hydra-help"}):
        try:
            compose(recipe, checked, config_dirs=[*dirs, *extra_paths])
        except QuantfwError as e:
            if debug:
                raise
            fail(command, str(e))

    import hydra

    register_configs()
    primary = next(
        (d for d in [*dirs, str(RECIPES_DIR)] if os.path.isfile(os.path.join(d, f"{recipe}.yaml"))),
        str(RECIPES_DIR),
    )
    # Hydra's parser takes overrides as one positional run: flags (and their values) first.
    flags = [a for a in rest if not ("=" in a and not a.startswith("-"))]
    sys.argv = [
        f"quantfw {command}",
        *flags,
        searchpath_override(extra_paths),
        *[a for a in rest if a not in flags],
    ]

    @hydra.main(config_path=os.path.abspath(primary), config_name=recipe, version_base="1.3")
    def _app(cfg):
        from quantfw.config.compose import validate

        try:
            validate(cfg)
            return run(cfg)
        except QuantfwError as e:
            if debug:
                raise
            fail(command, str(e))

    if debug:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    _app()


if __name__ == "__main__":
    main()
