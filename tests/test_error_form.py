"""Every expected failure is one line on stderr and exit 2 (130 for Ctrl-C), never a traceback;
`--debug` shows the traceback. Values are bounded before anything is allocated."""

import os
import signal
import subprocess
import sys

import pytest
from checkpoint_helpers import default_sigint
from hostile import ROOT, assert_one_line_exit_2, run_cli

from quantfw.config.bounds import MEMORY_LIMIT, estimate_bytes
from quantfw.errors import ConfigError

BAD_VALUES = [
    (["model.num_experts=0"], r"model.num_experts=0 is out of range \[1, "),
    (["model.hidden_size=-512"], r"model.hidden_size=-512 is out of range"),
    (["model.moe_intermediate_size=0"], r"model.moe_intermediate_size=0 is out of range"),
    (["model.num_layers=0"], r"model.num_layers=0 is out of range"),
    (["model.top_k=0"], r"model.top_k=0 is out of range"),
    (["model.top_k=9"], r"model.top_k=9 exceeds model.num_experts=8"),
    (["ep_size=0"], r"ep_size=0 is out of range"),
    (["tp_size=0"], r"tp_size=0 is out of range"),
    (["ep_size=2", "ep_rank=2"], r"ep_rank=2 must be below ep_size=2"),
    (["tp_rank=-1"], r"tp_rank=-1 is out of range"),
    (["tokens=0"], r"tokens=0 is out of range"),
    (["tokens=100000000"], r"tokens=100000000 is out of range \[1, 16777216\]"),
    (["eval.seq_len=0"], r"eval.seq_len=0 is out of range"),
    (["eval.ppl_tokens=-5"], r"eval.ppl_tokens=-5 is out of range"),
    (["bench.tokens=[1,0]"], r"bench.tokens: \[0\] out of range"),
    (["bench.copy_mb=100000"], r"bench.copy_mb=100000 is out of range"),
    (["calibration.tokens=0"], r"calibration.tokens=0 is out of range"),
    (["calibration.seq_len=0"], r"calibration.seq_len=0 is out of range"),
    (["calibration.batch_size=0"], r"calibration.batch_size=0 is out of range"),
    (["calibration.max_rows=0"], r"calibration.max_rows=0 is out of range"),
    (["calibration.guard_tokens=-1"], r"calibration.guard_tokens=-1 is out of range"),
]


@pytest.mark.parametrize("overrides, message", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_values_are_bounded_when_composed(compose, overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose("default", overrides)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["demo", "model.num_experts=0"], "model.num_experts=0 is out of range"),
        (["bench", "bench.tokens=[0]"], "bench.tokens"),
        (["eval", "eval.seq_len=0"], "eval.seq_len=0"),
        (["quantize", "calibration.batch_size=0"], "calibration.batch_size=0"),
    ],
)
def test_bad_values_are_one_line_in_every_command(tmp_path, args, needle):
    assert_one_line_exit_2(run_cli(*args, cwd=tmp_path), needle)


def test_a_typo_in_tokens_is_refused_before_allocating(tmp_path, compose):
    """demo tokens=10000000 on the tiny model: the estimate, not an OOM kill, answers."""
    cfg = compose("default", ["tokens=10000000"])
    need = estimate_bytes(cfg, "demo")
    assert need > MEMORY_LIMIT
    line = assert_one_line_exit_2(run_cli("demo", "tokens=10000000", cwd=tmp_path), "would allocate about")
    assert f"{need / 2**30:,.1f} GiB (limit 8.0 GiB)" in line
    # the defaults of every allocating command stay well inside the limit
    for command in ("demo", "eval", "bench"):
        assert 0 < estimate_bytes(compose("default"), command) < MEMORY_LIMIT
    # a real model's full layer in fp32 is not a demo
    assert estimate_bytes(compose("deepseek_v3_w4a8"), "demo") > MEMORY_LIMIT
    r = run_cli("demo", "recipe=deepseek_v3_w4a8", cwd=tmp_path)
    assert_one_line_exit_2(r, "demo with model=deepseek_v3", "would allocate")
    # plan only describes (meta tensors): no limit
    assert estimate_bytes(compose("deepseek_v3_w4a8"), "plan") == 0


def test_each_sweep_job_is_bounded(tmp_path):
    r = run_cli("plan", "-m", "tokens=16,0", cwd=tmp_path)
    assert_one_line_exit_2(r, "tokens=0 is out of range")
    assert "routed-expert memory" not in r.stdout  # no job ran before the bad one was found


@pytest.mark.parametrize(
    "sweep, needle",
    [
        ("model=glob(tin*)", "glob() sweeps are not supported"),
        ("tokens=interval(1,4)", "does not support sweep type"),
        ("tokens=range(1,2000)", "the sweep has 1999 jobs (limit 1000)"),
    ],
)
def test_sweeps_the_check_cannot_expand_are_refused(tmp_path, sweep, needle):
    assert_one_line_exit_2(run_cli("plan", "-m", sweep, cwd=tmp_path), needle)


@pytest.mark.parametrize(
    "errno_name, text",
    [("ENOSPC", "No space left on device"), ("ENOTDIR", "Not a directory"), ("EACCES", "Permission denied")],
)
def test_os_errors_name_the_path(tmp_path, errno_name, text):
    """An OSError raised inside a command (disk full while writing, a file where a folder should
    be, no permission) is one line naming the path: the real CLI, with `plan`'s run replaced."""
    path = tmp_path / "out" / "result.json"
    code = (
        "import errno, os, sys\n"
        "import quantfw.cli.plan as plan\n"
        "def boom(cfg):\n"
        f"    e = errno.{errno_name}\n"
        f"    raise OSError(e, os.strerror(e), {str(path)!r})\n"
        "plan.run = boom\n"
        "from quantfw.cli.main import main\n"
        "sys.argv = ['quantfw', 'plan']\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert_one_line_exit_2(r, f"{path}: {text}")


def test_debug_shows_the_traceback(tmp_path):
    r = run_cli("plan", "model.num_experts=0", "--debug", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr and "model.num_experts=0" in r.stderr


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "quantfw", "demo", "tokens=4096"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    try:
        first = p.stdout.readline()  # the demo prints its header before the long evaluation
        assert first.startswith("model=tiny"), first
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    lines = err.strip().splitlines()
    assert lines == ["quantfw demo: interrupted; rerun the same command to resume"], err
