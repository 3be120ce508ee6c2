"""The quantize command as a user runs it: bad input (one line, exit 2, nothing left behind),
overwrite, resume of an interrupted run, torchrun with 2 processes, fused expert tensors."""

import json
import shutil
import sys

import pytest
import torch
from checkpoint_helpers import cli, files_bytes, quantize, reshard, tensors
from safetensors.torch import save_file

from quantfw.errors import CheckpointError
from quantfw.integrations.hf import save_tiny_checkpoint
from quantfw.io.reader import CheckpointReader
from quantfw.quantize import checkpoint as ckpt


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint in 4 shards with an index (H=512, I=256, E=8)."""
    root = tmp_path_factory.mktemp("src")
    return reshard(save_tiny_checkpoint("qwen3_moe", root / "one"), root / "four", 4)


def _bad_copy(sharded, tmp_path, key, value):
    bad = tmp_path / "bad"
    shutil.copytree(sharded, bad)
    r = CheckpointReader(bad)
    shard = r.shard_of(key)
    ts = {k: r.get(k) for k in r.keys_in(shard)}
    ts[key] = value
    save_file(ts, str(bad / shard))
    return bad, shard


def _assert_refused(r, *needles, out=None):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()  # per-shard progress lines may precede the error
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("quantfw quantize: error:"), (
        r.stderr
    )
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.partial"))


KEY = "model.layers.1.mlp.experts.3.down_proj.weight"


@pytest.mark.parametrize(
    "case",
    # Each is a CLI subprocess (~5 s); the rarer cases run with -m slow.
    ["nan", "truncated", "missing_dir", "shape"]
    + [pytest.param(c, marks=pytest.mark.slow) for c in ("inf", "dtype", "missing_shard")],
)
def test_bad_input_one_line_exit_2_nothing_left(case, sharded, tmp_path):
    out = tmp_path / "out"
    w = torch.randn(512, 256)
    if case == "missing_dir":
        src, needles = tmp_path / "nowhere", ["nowhere", "does not exist"]
    elif case in ("nan", "inf"):
        w[3, 7] = float("nan") if case == "nan" else float("inf")
        src, shard = _bad_copy(sharded, tmp_path, KEY, w)
        needles = [shard, KEY, "NaN or Inf"]
    elif case == "dtype":
        src, shard = _bad_copy(sharded, tmp_path, KEY, w.to(torch.int32))
        needles = [KEY, "int32", "expected bf16, fp16 or fp32"]
    elif case == "shape":
        src, shard = _bad_copy(sharded, tmp_path, KEY, torch.randn(512, 128))
        needles = [KEY, "[512, 128]", "expected [512, 256]"]
    elif case == "truncated":
        src = tmp_path / "bad"
        shutil.copytree(sharded, src)
        p = src / "model-00003-of-00004.safetensors"
        p.write_bytes(p.read_bytes()[:-1000])
        needles = ["model-00003-of-00004.safetensors", "corrupt or truncated"]
    else:
        src = tmp_path / "bad"
        shutil.copytree(sharded, src)
        (src / "model-00002-of-00004.safetensors").unlink()
        needles = ["model-00002-of-00004.safetensors", "missing"]
    r = cli("quantize", f"input={src}", f"output={out}", "scheme=w4a8", "format=msmodelslim")
    _assert_refused(r, *needles, out=out)


def test_nonempty_output_refused_unless_overwrite(sharded, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    r = cli("quantize", f"input={sharded}", f"output={out}", "scheme=w8a8")
    _assert_refused(r, str(out), "not empty", "overwrite=true")
    assert (out / "keep.txt").read_text() == "user data"
    # overwrite=true replaces a quantfw output only (tests/test_untrusted_output_loss.py), here
    # a quantfw output the user added a file to.
    quantize(sharded, tmp_path / "earlier", "w8a8")
    shutil.rmtree(out)
    shutil.copytree(tmp_path / "earlier", out)
    (out / "keep.txt").write_text("user data")
    r = cli(
        "quantize", f"input={sharded}", f"output={out}", "scheme=w8a8", "format=msmodelslim", "overwrite=true"
    )
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "quant_model_description.json").is_file()
    assert "[4/4]" in r.stderr  # per-shard progress lines on stderr
    assert not list(tmp_path.glob(".*partial"))


def test_resume_skips_verified_shards_and_matches_a_fresh_run(sharded, tmp_path, monkeypatch):
    fresh = quantize(sharded, tmp_path / "fresh", "clip")
    out = tmp_path / "out"
    real = ckpt.Converter.convert_shard
    done = []

    def crash_on_third(self, shard, sink):
        if len(done) == 2:
            raise KeyboardInterrupt  # an interruption, not bad input: the partial folder stays
        done.append(shard)
        return real(self, shard, sink)

    monkeypatch.setattr(ckpt.Converter, "convert_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        quantize(sharded, out, "clip")
    partial = tmp_path / ".out.partial"
    assert not out.exists() and partial.is_dir()
    # A corrupted finished shard fails verification and is redone.
    first = partial / "model-00001-of-00004.safetensors"
    first.write_bytes(first.read_bytes()[:-1] + b"\x00")
    converted = []

    def count(self, shard, sink):
        converted.append(shard)
        return real(self, shard, sink)

    monkeypatch.setattr(ckpt.Converter, "convert_shard", count)
    quantize(sharded, out, "clip")
    assert converted == [
        "model-00001-of-00004.safetensors",
        "model-00003-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
    ]
    assert files_bytes(out) == files_bytes(fresh)
    assert not partial.exists()


def test_torchrun_two_processes_byte_identical(sharded, tmp_path):
    one = quantize(sharded, tmp_path / "one", "w4a8")
    two = tmp_path / "two"
    r = cli(
        "quantize",
        f"input={sharded}",
        f"output={two}",
        "scheme=w4a8",
        "format=msmodelslim",
        prefix=(
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
        ),
        env={"OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[:8000]
    assert files_bytes(two) == files_bytes(one)
    assert sorted(files_bytes(one)) == [
        "config.json",
        "quant_model_description.json",
        *[f"quant_model_weight_w8a8_dynamic-0000{i}-of-00004.safetensors" for i in range(1, 5)],
        "quant_model_weight_w8a8_dynamic.safetensors.index.json",
    ]


def test_fused_expert_tensors_quantize_like_per_expert(sharded, tmp_path):
    r = CheckpointReader(sharded)
    fused = tmp_path / "fused"
    fused.mkdir()
    ts = {}
    for k in r.keys():
        if ".experts." not in k:
            ts[k] = r.get(k)
    for L in (0, 1):
        p = f"model.layers.{L}.mlp.experts"
        ts[f"{p}.gate_up_proj"] = torch.stack(
            [
                torch.cat([r.get(f"{p}.{e}.gate_proj.weight"), r.get(f"{p}.{e}.up_proj.weight")])
                for e in range(8)
            ]
        )
        ts[f"{p}.down_proj"] = torch.stack([r.get(f"{p}.{e}.down_proj.weight") for e in range(8)])
    save_file(ts, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((sharded / "config.json").read_text())
    a, b = (
        tensors(quantize(fused, tmp_path / "qa", "w8a8")),
        tensors(quantize(sharded, tmp_path / "qb", "w8a8")),
    )
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_python_api_errors_are_checkpoint_errors(sharded, tmp_path):
    with pytest.raises(CheckpointError, match="is the input folder"):
        quantize(sharded, sharded, "w8a8")
    cfg = json.loads((sharded / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe"
