"""The CLI as a user runs it: a subprocess in an empty folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quantfw(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "quantfw.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_help_lists_commands(tmp_path):
    r = quantfw("--help", cwd=tmp_path)
    assert r.returncode == 0
    for cmd in ("demo", "plan"):
        assert f"  {cmd}" in r.stdout


def test_plan_deepseek_memory_and_no_stray_files(tmp_path):
    r = quantfw("plan", "recipe=deepseek_v3_w4a8_clip", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "58 MoE layers x 256 experts" in r.stdout
    assert "w2_alpha" in r.stdout and "[256, 7168, 512]" in r.stdout  # w13 weight after post-load
    assert list(tmp_path.iterdir()) == []  # no outputs/, .hydra/ or log files


@pytest.mark.parametrize(
    "args, message",
    [
        (["plan", "scheme=w9"], "available scheme: w4a8, w4a8_clip, w8a8"),
        (["plan", "scheme.group_size=abc"], "key: scheme.group_size"),
        (["plan", "+scheme.foo=1"], "Key 'foo' not in 'SchemeConfig'"),
        (["plan", "recipe=nope"], "unknown recipe 'nope'"),
        (["nope"], "unknown command 'nope'"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    r = quantfw(*args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("quantfw "), r.stderr
    assert "Traceback" not in r.stderr


def test_hydra_cfg_job_and_multirun(tmp_path):
    r = quantfw("plan", "scheme=w8a8", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0 and "name: w8a8" in r.stdout
    r = quantfw("plan", "--multirun", "scheme=w8a8,w4a8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("routed-expert memory of tiny") == 2
    assert list(tmp_path.iterdir()) == []  # no multirun/, outputs/ or multirun.yaml here


def test_user_config_dir(tmp_path):
    d = tmp_path / "mine"
    (d / "model").mkdir(parents=True)
    (d / "model" / "small.yaml").write_text(
        "name: small\nhidden_size: 256\nmoe_intermediate_size: 128\nnum_experts: 4\ntop_k: 2\nnum_layers: 3\n"
    )
    (d / "small_w8a8.yaml").write_text(
        "defaults:\n  - quantfw\n  - override model: small\n  - override scheme: w8a8\n  - _self_\n"
    )
    r = quantfw("plan", "--config-dir", str(d), "recipe=small_w8a8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "model=small scheme=w8a8" in r.stdout


def test_demo_main_job(tmp_path):
    r = quantfw("demo", "tokens=128", "out=demo.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "w4a8_clip per-channel [compressed_tensors] learned alpha" in r.stdout
    rows = {row["scheme"]: row for row in json.loads((tmp_path / "demo.json").read_text())["rows"]}
    w8, g256, pc = "w8a8 per-channel [msmodelslim]", "w4a8 g256 [msmodelslim]", "w4a8 per-channel [msmodelslim]"
    clip1 = "w4a8_clip per-channel [compressed_tensors] alpha=1"
    learned = "w4a8_clip per-channel [compressed_tensors] learned alpha"
    assert {w8, g256, pc, clip1, learned} <= set(rows)
    assert rows[w8]["rel_l2"] < 0.1 < rows[pc]["rel_l2"]
    assert rows[learned]["rel_l2"] <= rows[clip1]["rel_l2"]
    assert rows[pc]["bytes"] < rows[w8]["bytes"] < rows["bf16 (float)"]["bytes"]
