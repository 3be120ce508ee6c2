"""Engine-faithful evaluation: a layer loaded for an engine computes that engine's plan for the
checkpoint, bit for bit (sglang / vllm-ascend: a clip checkpoint unclipped; cann-recipes: the clip
op always, alpha = 1 when the checkpoint has none)."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_helpers import cli, quantize

from quantfw.calibrate.result import CalibrationResult
from quantfw.engines import load_engine_layer, plan_overrides
from quantfw.eval.synthetic import hidden_states, random_routing
from quantfw.io.loader import load_layer, open_checkpoint

pytest.importorskip("transformers")
from engine_helpers import deepseek_float  # noqa: E402

LAYER = 1


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-eval")
    flt = deepseek_float(root)
    alphas = {LAYER: torch.linspace(0.35, 0.9, 8)}  # learned-looking alphas: the clip matters
    return {
        "float": flt,
        "clip": quantize(flt, root / "clip", "clip", calibration=CalibrationResult(alphas)),
        "noclip": quantize_noclip(flt, root / "noclip"),
        "pc": quantize(flt, root / "pc", "w4a8_pc"),
    }


def quantize_noclip(src, dst):
    from quantfw.api import components
    from quantfw.config.compose import compose
    from quantfw.quantize.checkpoint import quantize_checkpoint

    s, f, _ = components(compose("default", ["scheme=w4a8", "scheme.group_size=0", "format=compressed_tensors"]))
    return quantize_checkpoint(src, dst, s, f, progress=False)


def _out(layer):
    x = hidden_states(64, 512, seed=1)
    w, ids = random_routing(64, 8, 2, seed=2)
    return layer(x, w, ids)


def _plain(ckpt, *overrides):
    op = open_checkpoint(ckpt, "default", list(overrides))
    return _out(load_layer(op, LAYER))


def test_sglang_and_vllm_run_a_clip_checkpoint_unclipped(ckpts):
    unclipped = _plain(ckpts["clip"], "scheme.activation_use_clip=false")
    clipped = _plain(ckpts["clip"])
    assert not torch.equal(unclipped, clipped)
    for engine in ("sglang_npu", "vllm_ascend"):
        got = _out(load_engine_layer(ckpts["clip"], engine, LAYER))
        assert torch.equal(got, unclipped), engine


def test_cann_recipes_runs_the_clip_op_always(ckpts):
    # a clip checkpoint: its own alphas, as quantfw's default plan
    assert torch.equal(_out(load_engine_layer(ckpts["clip"], "cann_recipes", LAYER)), _plain(ckpts["clip"]))
    # a W4A8 checkpoint without alphas: the clip op with alpha = 1, not the bf16-SwiGLU W4A8 path
    with pytest.warns(UserWarning, match="missing_alpha=ones loads alpha = 1"):
        got = _out(load_engine_layer(ckpts["noclip"], "cann_recipes", LAYER))
        forced = _plain(ckpts["noclip"], "scheme.activation_use_clip=true", "scheme.missing_alpha=ones")
    assert torch.equal(got, forced)
    assert not torch.equal(got, _plain(ckpts["noclip"]))
    assert plan_overrides("cann_recipes", {"weight_bits": 4, "group_size": 0, "activation_use_clip": False}) == [
        "scheme.activation_use_clip=true",
        "scheme.missing_alpha=ones",
    ]
    assert plan_overrides("cann_recipes", {"weight_bits": 8, "group_size": 0, "activation_use_clip": False}) == []


def test_no_plan_step_leaves_the_layer_as_it_is(ckpts):
    assert torch.equal(_out(load_engine_layer(ckpts["pc"], "vllm_ascend", LAYER)), _plain(ckpts["pc"]))


def test_eval_cli_reports_the_engines_error(ckpts, tmp_path):
    common = [f"checkpoint={ckpts['clip']}", f"reference={ckpts['float']}", "tokens=64", "eval.per_expert=false"]
    r = cli("eval", *common, "engine=sglang_npu", f"out={tmp_path / 'sg.json'}")
    assert r.returncode == 0, r.stderr
    assert "engine sglang_npu: plan overrides ['scheme.activation_use_clip=false']" in r.stderr
    r2 = cli("eval", *common, "scheme.activation_use_clip=false", f"out={tmp_path / 'off.json'}")
    r3 = cli("eval", *common, f"out={tmp_path / 'on.json'}")
    assert r2.returncode == 0 and r3.returncode == 0, r2.stderr + r3.stderr
    sg, off, on = (json.loads((tmp_path / f).read_text()) for f in ("sg.json", "off.json", "on.json"))
    assert sg["engine"] == "sglang_npu" and sg["engine_plan"] == ["scheme.activation_use_clip=false"]
    # Separate processes: the float reference's reductions matched to ~1e-7 relative, not always
    # bit for bit, under a loaded machine (the in-process layers above are compared bit for bit).
    rel = {name: {row["layer"]: row["rel_l2"] for row in d["layers"]} for name, d in (("sg", sg), ("off", off), ("on", on))}
    for layer, b in rel["off"].items():
        assert abs(rel["sg"][layer] - b) <= 1e-5 * b
    assert abs(rel["on"][LAYER] - rel["off"][LAYER]) > 1e-3 * rel["off"][LAYER]  # its alphas clip hard
