"""A recipe folder cannot make Hydra create, truncate or rewrite files: not through a file
handler, nor run/sweep dirs, output_subdir, chdir or the environment. The victim file and the
folder listing before/after prove nothing was written."""

import pytest
from hostile import assert_one_line_exit_2, recipe, run_cli, snapshot, write_folder

from quantfw.errors import ConfigError

WRITE = "recipes may not choose where Hydra writes"


def _cases(victim, out):
    return [
        (
            "FileHandler mode w on an existing file",
            recipe(
                "job_logging:\n  handlers:\n    file:\n      class: logging.FileHandler\n"
                f"      filename: {victim}\n      mode: w\n  root:\n    handlers: [file]\n"
            ),
            [],
            "hydra.job_logging.handlers.file.class=logging.FileHandler: recipes may not configure Hydra's logging",
        ),
        ("hydra.run.dir", recipe(f"run:\n  dir: {out}\n"), [], f"hydra.run.dir={out}: {WRITE}"),
        ("hydra.sweep.dir", recipe(f"sweep:\n  dir: {out}\n"), ["-m"], f"hydra.sweep.dir={out}: {WRITE}"),
        ("hydra.sweep.subdir", recipe("sweep:\n  subdir: ../../escaped\n"), ["-m"], "hydra.sweep.subdir"),
        ("output_subdir", recipe("output_subdir: .hydra\n"), [], f"hydra.output_subdir=.hydra: {WRITE}"),
        (
            "job.chdir",
            recipe(f"run:\n  dir: {out}\njob:\n  chdir: true\n"),
            [],
            "recipes may not",
        ),
        (
            "env_set",
            recipe("job:\n  env_set:\n    PYTHONSTARTUP: /x\n"),
            [],
            "hydra.job.env_set.PYTHONSTARTUP=/x",
        ),
        ("env_copy", recipe("job:\n  env_copy: [HOME]\n"), [], "recipes may not read environment variables"),
    ]


NAMES = [c[0] for c in _cases("V", "O")]


@pytest.mark.parametrize("name", NAMES)
def test_hostile_folder_writes_nothing(tmp_path, compose, name):
    victim, out = tmp_path / "victim.txt", tmp_path / "outdir"
    victim.write_text("precious\n")
    _, body, args, needle = next(c for c in _cases(victim, out) if c[0] == name)
    folder = write_folder(tmp_path / "rec", {"r.yaml": body})
    work = tmp_path / "work"
    work.mkdir()
    before = snapshot(tmp_path)
    r = run_cli("plan", "--config-dir", str(folder), "recipe=r", *args, cwd=work)
    assert_one_line_exit_2(r, needle)
    assert snapshot(tmp_path) == before
    assert victim.read_text() == "precious\n"
    assert not out.exists()
    with pytest.raises(ConfigError, match="recipes may not"):
        compose("r", config_dirs=[folder])


def test_command_line_hydra_dirs_are_refused_too(tmp_path):
    out = tmp_path / "outdir"
    r = run_cli("plan", f"hydra.run.dir={out}", cwd=tmp_path)
    assert_one_line_exit_2(r, "hydra.run.dir")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_trusted_base_writes_nothing_in_the_work_folder(tmp_path):
    """The package's own base: plain runs and sweeps leave the working folder empty."""
    for args in (["plan"], ["plan", "-m", "scheme=w8a8,w4a8"]):
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert list(tmp_path.iterdir()) == []
