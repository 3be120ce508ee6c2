"""Data-driven weight observers in checkpoint quantization: `quantize ... scheme.weight_observer=gptq
calibration.source=model` captures each expert's routed inputs from the float model, GPTQ uses them,
and the metadata's quantfw block records it as `weight_calibration`."""

import json

import pytest
import torch
from checkpoint_helpers import cli, float_experts
from omegaconf import OmegaConf

from quantfw.api import components
from quantfw.calibrate.model import calibrate_checkpoint, load_float_model
from quantfw.config.compose import compose
from quantfw.eval.metrics import compare
from quantfw.integrations.hf import save_tiny_checkpoint, swap_moe_experts
from quantfw.io.loader import from_checkpoint
from quantfw.io.reader import CheckpointReader
from quantfw.moe.reference import FloatMoE
from quantfw.quantize.checkpoint import quantize_checkpoint

BASE = ["scheme=w4a8", "scheme.group_size=0", "format=msmodelslim"]
CALIB = ["calibration.tokens=4096", "calibration.seq_len=128"]
WEIGHT = "model.layers.{L}.mlp.experts.{e}.{p}_proj.weight"


def calib(tokens=4096):
    return OmegaConf.create(
        {
            "tokens": 4096,
            "seq_len": 128,
            "batch_size": 4,
            "min_tokens": 16,
            "policy": "ones",
            "max_rows": 1024,
        }
    )


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("float") / "qwen3", seed=3)


@pytest.fixture(scope="module")
def gptq_cli(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "q"
    r = cli(
        "quantize",
        f"input={src}",
        f"output={out}",
        *BASE,
        "scheme.weight_observer=gptq",
        "calibration.source=model",
        *CALIB,
    )
    assert r.returncode == 0, r.stderr
    return out, r


def api_quantize(src, dst, overrides, calibrate=True, tokens=1024):
    scheme, fmt, _ = components(compose("default", BASE + overrides))
    res = calibrate_checkpoint(src, scheme, calib(tokens), 0) if calibrate else None
    return quantize_checkpoint(src, dst, scheme, fmt, progress=False, calibration=res)


def prov(folder):
    return json.loads((folder / "quant_model_description.json").read_text())["quantfw"]


def weights(folder):
    r = CheckpointReader(folder)
    return {k: r.get(k) for k in sorted(r.keys()) if k.endswith("_proj.weight") and ".experts." in k}


@pytest.fixture(scope="module")
def minmax(src, tmp_path_factory):
    return api_quantize(src, tmp_path_factory.mktemp("mm") / "q", [], calibrate=False)


def test_gptq_metadata_lists_observer_and_coverage(gptq_cli):
    out, r = gptq_cli
    wc = prov(out)["weight_calibration"]
    assert wc["weight_observer"] == "gptq" and wc["gptq_damp"] == 0.01
    assert wc["data"]["token_source"] == "pseudo_random" and wc["data"]["calibration_tokens"] == 4096
    coverage = {int(L): c for L, c in wc["data"]["coverage"].items()}
    assert sorted(coverage) == [0, 1] and all(len(c) == 8 for c in coverage.values())
    assert sum(map(sum, coverage.values())) > 0
    assert wc["projections"] == 2 * 8 * 3  # layers x experts x (gate, up, down)
    # experts below observer_min_tokens (16) fall back, every other projection ran GPTQ
    rows = {int(L): v for L, v in wc["data"]["rows"].items()}
    starved = sum(3 for L in rows for n in rows[L] if n < 16)
    assert wc["fallback"]["count"] == starved and wc["data_driven"] == 48 - starved > 0
    assert "alpha_calibration" not in prov(out)
    assert "captured expert inputs of 2 layer(s)" in r.stderr


def test_gptq_ints_differ_from_minmax_same_shapes(gptq_cli, minmax):
    g, m = weights(gptq_cli[0]), weights(minmax)
    assert g.keys() == m.keys() and len(g) == 48
    assert all(g[k].shape == m[k].shape and g[k].dtype == m[k].dtype for k in g)
    differ = sum(not torch.equal(g[k], m[k]) for k in g)
    assert differ >= prov(gptq_cli[0])["weight_calibration"]["data_driven"] // 2


def routed_hidden(src, layer, seed=11):
    """(hidden, topk_weights, topk_ids) the float model feeds MoE layer `layer` on held-out tokens."""
    model = load_float_model(src)
    swap = swap_moe_experts(model, lambda w13, w2, _layer: FloatMoE(w13, w2))
    entry = next(e for e in swap.entries if e.layer_index == layer)
    seen = []
    hook = model.get_submodule(entry.path).experts.register_forward_hook(lambda m, a, o: seen.append(a[:3]))
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    hook.remove()
    return seen[0]


def test_check_passes_and_forward_close_to_float(gptq_cli, minmax, src):
    r = cli("check", f"checkpoint={gptq_cli[0]}")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    w13, w2 = float_experts(CheckpointReader(src), 1)
    x, w, ids = routed_hidden(src, 1)
    ref = FloatMoE(w13, w2)(x, w, ids)
    got = compare(from_checkpoint(gptq_cli[0], layer=1)(x, w, ids), ref)
    base = compare(from_checkpoint(minmax, layer=1)(x, w, ids), ref)
    assert got["cosine"] > 0.98 and got["rel_l2"] < 0.2, got  # min-max: 0.233 here
    assert got["rel_l2"] < base["rel_l2"], (
        got,
        base,
    )  # held-out tokens: GPTQ beats min-max (needs rows > K: ~1000 rows/expert vs K=512)


def test_too_few_tokens_everything_falls_back_to_minmax(src, minmax, tmp_path):
    out = api_quantize(
        src, tmp_path / "q", ["scheme.weight_observer=gptq", "scheme.observer_min_tokens=100000"]
    )
    wc = prov(out)["weight_calibration"]
    assert wc["data_driven"] == 0 and wc["fallback"]["count"] == wc["projections"] == 48
    assert wc["fallback"]["observer"] == "minmax"
    assert wc["fallback"]["experts"] == {L: {p: list(range(8)) for p in ("down", "gate", "up")} for L in "01"}
    g, m = weights(out), weights(minmax)
    assert all(torch.equal(g[k], m[k]) for k in g)  # the fallback is exactly min-max


def test_learned_clip_records_mean_ratios(src, tmp_path):
    out = api_quantize(src, tmp_path / "q", ["scheme.weight_observer=learned_clip"])
    wc = prov(out)["weight_calibration"]
    assert wc["weight_observer"] == "learned_clip" and wc["data_driven"] > 0
    ratios = [r for L in wc["clip_ratio_mean"].values() for p in L.values() for _, r in p]
    assert len(ratios) == wc["data_driven"] and all(0.5 <= r <= 1 for r in ratios)
    assert any(r < 1 for r in ratios)
