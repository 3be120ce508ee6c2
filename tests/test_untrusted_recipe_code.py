"""A recipe folder from a stranger cannot make quantfw (or Hydra) import and run code.

Each hostile folder carries a payload that would `touch` a marker file if Hydra ever handed it to
logging.config, instantiate() or a launcher; the marker must not exist after the CLI ran (a
subprocess, as a user runs it) and compose() must refuse the same folder.
"""

import logging.config

import pytest
from hostile import assert_one_line_exit_2, recipe, run_cli, snapshot, write_folder

from quantfw.errors import ConfigError

CODE = "recipes may not name code to run"
LOGGING = "recipes may not configure Hydra's logging: it can import and run code"


def popen_formatter(marker):  # passes a `logging.` prefix test: os.popen runs `format` in a shell
    return {"class": "logging.os.popen", "format": f"touch {marker}", "datefmt": "r", "style": 1}


def popen_handler(marker):
    return {"class": "subprocess.Popen", "args": ["touch", str(marker)]}


def factory_formatter(marker):
    return {"()": "subprocess.Popen", "args": ["touch", str(marker)]}


@pytest.mark.parametrize("payload", [popen_formatter, factory_formatter])
def test_payloads_are_live(tmp_path, payload):
    """Control: the formatter payloads really run a command when logging.config receives them,
    so a missing marker below means the payload never reached it."""
    marker = tmp_path / "ran"
    try:
        logging.config.dictConfig({"version": 1, "formatters": {"f": payload(marker)}})
    except Exception:
        pass  # the payload ran before logging noticed the result is not a formatter
    for _ in range(100):
        if marker.exists():
            break
        import time

        time.sleep(0.05)
    assert marker.exists()


def test_handler_payload_is_live(tmp_path):
    marker = tmp_path / "ran"
    try:
        logging.config.dictConfig({"version": 1, "handlers": {"h": popen_handler(marker)}})
    except Exception:
        pass
    import time

    for _ in range(100):
        if marker.exists():
            break
        time.sleep(0.05)
    assert marker.exists()


def _yaml_map(d: dict, indent: int) -> str:
    pad = " " * indent
    lines = []
    for k, v in d.items():
        key = f'"{k}"' if k == "()" else k
        lines.append(f"{pad}{key}: {v if not isinstance(v, list) else '[' + ', '.join(map(str, v)) + ']'}")
    return "\n".join(lines) + "\n"


def _cases(marker):
    """(name, files of the recipe folder, extra CLI args, text the refusal names)."""
    fmt = _yaml_map(popen_formatter(marker), 6)
    handler = _yaml_map(popen_handler(marker), 6)
    factory = _yaml_map(factory_formatter(marker), 6)
    evil_target = f"_target_: subprocess.Popen\nargs: [touch, {marker}]\n"
    return [
        (
            "logging.os.popen formatter",
            {"r.yaml": recipe("job_logging:\n  formatters:\n    f:\n" + fmt)},
            [],
            "hydra.job_logging.formatters.f.class=logging.os.popen",
        ),
        (
            "multirun recipe whose sweeper params add a Popen handler",
            {
                "r.yaml": recipe(
                    "mode: MULTIRUN\nsweeper:\n  params:\n"
                    "    +hydra.job_logging.handlers.h.class: subprocess.Popen\n"
                    f"    +hydra.job_logging.handlers.h.args: '[touch,{marker}]'\n"
                )
            },
            [],
            "hydra.sweeper.params",
        ),
        (
            "Popen handler in hydra_logging",
            {"r.yaml": recipe("hydra_logging:\n  handlers:\n    h:\n" + handler)},
            [],
            "hydra.hydra_logging.handlers.h.class=subprocess.Popen",
        ),
        (
            "() factory formatter",
            {"r.yaml": recipe("job_logging:\n  formatters:\n    f:\n" + factory)},
            [],
            "hydra.job_logging.formatters.f.()=subprocess.Popen",
        ),
        (
            "ext:// stream swapped",
            {
                "r.yaml": recipe(
                    "job_logging:\n  handlers:\n    console:\n      stream: ext://sys.__stderr__\n"
                )
            },
            [],
            "hydra.job_logging.handlers.console.stream=ext://sys.__stderr__",
        ),
        (
            "a dotted key that flattens onto the trusted handler's class",
            {
                "r.yaml": recipe(
                    "job_logging:\n  handlers:\n    console:\n      class: subprocess.Popen\n"
                    "      args: [touch, " + str(marker) + "]\n    console.class: logging.StreamHandler\n"
                )
            },
            [],
            "hydra.job_logging.handlers.console.class=subprocess.Popen",
        ),
        (
            "callback",
            {"r.yaml": recipe("callbacks:\n  x:\n" + _yaml_map({"_target_": "subprocess.Popen"}, 4))},
            [],
            f"hydra.callbacks: {CODE}",
        ),
        (
            "launcher from the folder's hydra/launcher group",
            {
                "hydra/launcher/evil.yaml": evil_target,
                "r.yaml": recipe(extra_defaults="  - override hydra/launcher: evil\n"),
            },
            [],
            "hydra.launcher._target_=subprocess.Popen",
        ),
        (
            "sweeper from the folder's hydra/sweeper group",
            {
                "hydra/sweeper/evil.yaml": evil_target,
                "r.yaml": recipe(extra_defaults="  - override hydra/sweeper: evil\n"),
            },
            ["-m"],
            "hydra.sweeper._target_=subprocess.Popen",
        ),
        (
            "job logging from the folder's hydra/job_logging group",
            {
                "hydra/job_logging/evil.yaml": "version: 1\nhandlers:\n  h:\n"
                + _yaml_map(popen_handler(marker), 4),
                "r.yaml": recipe(extra_defaults="  - override hydra/job_logging: evil\n"),
            },
            [],
            "hydra.job_logging.handlers.h.class=subprocess.Popen",
        ),
        (
            "a model option that a command-line sweep picks, writing a handler into the hydra package",
            {
                "model/evil.yaml": "# @package _global_\nmodel:\n  name: evil\n  hidden_size: 512\n"
                "  moe_intermediate_size: 256\n  num_experts: 8\n  top_k: 2\n  num_layers: 2\n"
                "hydra:\n  job_logging:\n    handlers:\n      h:\n" + _yaml_map(popen_handler(marker), 8),
                "r.yaml": recipe(),
            },
            ["-m", "model=tiny,evil"],
            "hydra.job_logging.handlers.h.class=subprocess.Popen",
        ),
    ]


CASE_NAMES = [c[0] for c in _cases("M")]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_hostile_folder_runs_nothing(tmp_path, compose, name):
    marker = tmp_path / "ran"
    _, files, args, needle = next(c for c in _cases(marker) if c[0] == name)
    folder = write_folder(tmp_path / "rec", files)
    work = tmp_path / "work"
    work.mkdir()
    before = snapshot(tmp_path)
    r = run_cli("plan", "--config-dir", str(folder), "recipe=r", *args, cwd=work)
    assert_one_line_exit_2(r, needle)
    assert not marker.exists()
    assert snapshot(tmp_path) == before  # nothing created, truncated or rewritten
    overrides = [a for a in args if "=" in a]
    with pytest.raises(ConfigError, match="recipes may not"):
        if "-m" in args:
            from quantfw.config.compose import check_run

            check_run("r", overrides, [folder], multirun=True)
        else:
            compose("r", overrides, config_dirs=[folder])
    assert not marker.exists()


def test_command_line_cannot_name_code_either(tmp_path):
    """Hydra keys typed on the command line pass the same allow-list (only hydra.verbose)."""
    marker = tmp_path / "ran"
    r = run_cli(
        "plan",
        "+hydra.job_logging.handlers.h.class=subprocess.Popen",
        f"+hydra.job_logging.handlers.h.args=[touch,{marker}]",
        cwd=tmp_path,
    )
    assert_one_line_exit_2(r, "hydra.job_logging.handlers.h.class=subprocess.Popen")
    assert not marker.exists()
    r = run_cli("plan", "~hydra.job_logging.root", cwd=tmp_path)  # a deletion has no '='
    assert_one_line_exit_2(r, "hydra.job_logging.root")
    r = run_cli("plan", "--experimental-rerun", "x.pickle", cwd=tmp_path)
    assert_one_line_exit_2(r, "never loads pickles")


def test_harmless_keys_still_work(tmp_path):
    """hydra.verbose is allowed; --multirun sweeps of ordinary keys keep running every job."""
    r = run_cli("plan", "hydra.verbose=true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("plan", "-m", "scheme=w8a8,w4a8,w4a8_clip", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("routed-expert memory of tiny") == 3
    assert list(tmp_path.iterdir()) == []
