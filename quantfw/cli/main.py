"""`quantfw <command> [recipe=NAME] [--config-dir DIR] [key=value ...]`.

Every command is a Hydra app over the same recipes, so `--cfg job`, `--multirun` and
`--config-dir` (user recipe folders) work as in any Hydra program. Expected errors print one
line on stderr and exit 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

from quantfw.errors import ConfigError, QuantfwError

USAGE = """usage: quantfw <command> [recipe=NAME] [--config-dir DIR] [overrides ...] [--debug]

commands:
{commands}

Recipes: recipes/*.yaml (recipe=deepseek_v3_w4a8_clip); your own with --config-dir DIR.
Overrides: scheme=w4a8 scheme.group_size=0 scheme.activation_use_clip=true model=qwen3_30b_a3b ...
`quantfw <command> --help`: that command's page (what it does, required keys, options with
their defaults, examples, its docs page).
Hydra flags: --cfg job (the composed config), --multirun (-m), --hydra-help.
"""


def _commands():
    from quantfw.cli.commands import COMMANDS

    return COMMANDS


def say(line: str) -> None:
    """One stderr line in one write: torchrun ranks share the pipe, and print's separate newline
    write (python -u) lets their lines run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def fail(command: str, message: str) -> None:
    say(f"quantfw {command}: error: {message}")
    sys.exit(2)


def _split_args(argv: list[str]):
    """Pull out recipe=NAME, --debug and user config dirs; split the rest into Hydra flags (with
    their values) and overrides (every positional argument, `~key` deletions included)."""
    recipe, debug, dirs, flags, overrides = "default", False, [], [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("recipe="):
            recipe = a.split("=", 1)[1]
        elif a == "--debug":
            debug = True
        elif a in ("--config-dir", "-cd"):
            if i + 1 == len(argv):
                raise ConfigError(f"{a} needs a folder")
            dirs.append(argv[i + 1])
            i += 1
        elif a.startswith(("--config-dir=", "-cd=")):
            dirs.append(a.split("=", 1)[1])
        elif a in REFUSED_FLAGS or a.startswith(tuple(f + "=" for f in REFUSED_FLAGS)):
            raise ConfigError(f"{a}: {REFUSED_FLAGS[a.split('=', 1)[0]]}")
        elif a.startswith("-"):
            flags.append(a)
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if a in VALUE_FLAGS and nxt is not None and not nxt.startswith("-") and "=" not in nxt:
                flags.append(nxt)
                i += 1
        else:
            overrides.append(a)
        i += 1
    return recipe, debug, dirs, flags, overrides


# Hydra flags followed by a value (--cfg job, --package scheme, --info searchpath).
VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--info", "-i")
# Hydra flags that would bypass the checks: another primary config, or a pickled config to rerun.
REFUSED_FLAGS = {
    "--config-name": "use recipe=NAME instead",
    "-cn": "use recipe=NAME instead",
    "--config-path": "use --config-dir DIR instead",
    "-cp": "use --config-dir DIR instead",
    "--experimental-rerun": "quantfw never loads pickles; rerun the command instead",
}
# Hydra flags that only print: no job runs, so nothing is allocated.
PRINT_ONLY = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc")


def expected_error_line(e: BaseException) -> str | None:
    """The one line of an expected failure, None for a bug (which keeps its traceback)."""
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, QuantfwError):
        return str(e)
    if isinstance(e, OSError):
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        return f"{where}: {e.strerror or e}" if e.filename else f"{type(e).__name__}: {e.strerror or e}"
    if isinstance(e, OmegaConfBaseException):
        from quantfw.config.compose import error_line

        return error_line(e)
    return None


def _reader_left() -> None:
    """`quantfw plan | head`: the reader left; nothing to report (and no error at interpreter exit)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else "?"
    debug = "--debug" in argv
    try:
        _main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        say(f"quantfw {command}: interrupted; rerun the same command to resume")
        sys.exit(130)
    except BrokenPipeError:
        _reader_left()
    except Exception as e:
        line = expected_error_line(e)
        if line is None or debug:
            raise
        fail(command, line)


def _main(argv: list[str]) -> None:
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        listing = "\n".join(f"  {n:<10} {c.summary}" for n, c in commands.items())
        print(USAGE.format(commands=listing))
        return
    command, argv = argv[0], argv[1:]
    if command not in commands:
        fail(command, f"unknown command '{command}' (available: {', '.join(commands)})")
    recipe, debug, dirs, flags, overrides = _split_args(argv)
    if "--help" in flags or "-h" in flags:
        from quantfw.cli.help_page import page

        print(page(command, commands[command], recipe, overrides, dirs))
        return
    import importlib

    run = importlib.import_module(commands[command].module).run

    from quantfw.config.bounds import check_memory
    from quantfw.config.compose import check_run, hydra_args
    from quantfw.config.schema import register_configs

    for a in [a for a in overrides if a.startswith("hydra.searchpath=")]:
        # the user's folders join conf/ and recipes/ instead of replacing them
        dirs += [p.strip() for p in a.split("=", 1)[1].strip("[]").split(",") if p.strip()]
        overrides.remove(a)
    # Everything Hydra will compose (each job of a sweep included) is checked before Hydra runs
    # anything: it configures logging, creates folders and instantiates plugins before our task.
    cfgs = check_run(recipe, overrides, dirs, multirun=any(a in ("-m", "--multirun") for a in flags))
    if not any(f in PRINT_ONLY for f in flags):
        for cfg in cfgs:
            check_memory(cfg, command)

    import hydra

    register_configs()
    primary, passed = hydra_args(recipe, overrides, dirs)
    # Hydra's parser takes overrides as one positional run: flags (and their values) first.
    sys.argv = [f"quantfw {command}", *flags, *passed]

    @hydra.main(config_path=str(primary), config_name=recipe, version_base="1.3")
    def _app(cfg):
        from quantfw.config.compose import validate

        try:
            validate(cfg)
            return run(cfg)
        except BrokenPipeError:
            _reader_left()
        except Exception as e:  # Hydra would print its own report and exit 1
            line = expected_error_line(e)
            if line is None or debug:
                raise
            fail(command, line)

    if debug:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    _app()


if __name__ == "__main__":
    main()
