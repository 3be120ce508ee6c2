"""`quantize` with calibration.source=model: learned alphas land in the clip checkpoint and load."""

import json

import pytest
import torch
from checkpoint_helpers import cli
from omegaconf import OmegaConf

from quantfw.api import components
from quantfw.calibrate.experts import ExpertCapture, learn_expert_alphas
from quantfw.calibrate.model import calibrate_checkpoint, calibration_tokens, load_float_model
from quantfw.config.compose import compose
from quantfw.errors import CalibrationError
from quantfw.eval.synthetic import hidden_states, random_routing
from quantfw.integrations.hf import save_tiny_checkpoint, swap_moe_experts
from quantfw.io.loader import from_checkpoint
from quantfw.io.reader import CheckpointReader
from quantfw.moe.reference import FloatMoE
from quantfw.quantize.checkpoint import quantize_checkpoint

CLIP_CT = ["scheme=w4a8_clip", "format=compressed_tensors"]
CLIP_MS = ["scheme=w4a8", "scheme.group_size=0", "scheme.activation_use_clip=true", "format=msmodelslim"]
ALPHA_KEY = "model.layers.{L}.mlp.experts.{e}.down_proj.alpha"


def calib(**kw):
    base = {
        "tokens": 512,
        "seq_len": 128,
        "batch_size": 4,
        "min_tokens": 16,
        "policy": "ones",
        "max_rows": 1024,
    }
    return OmegaConf.create({**base, **kw})


@pytest.fixture(scope="module")
def floats(tmp_path_factory):
    root = tmp_path_factory.mktemp("float")
    return {arch: save_tiny_checkpoint(arch, root / arch, seed=3) for arch in ("qwen3_moe", "deepseek_v3")}


def quantize(src, dst, overrides, c=None, seed=0):
    scheme, fmt, _ = components(compose("default", overrides))
    result = calibrate_checkpoint(src, scheme, c or calib(), seed) if c is not False else None
    out = quantize_checkpoint(src, dst, scheme, fmt, progress=False, calibration=result)
    return out, result


def written_alphas(folder, layers, E=8):
    r = CheckpointReader(folder)
    return {L: torch.stack([r.get(ALPHA_KEY.format(L=L, e=e)).reshape(()) for e in range(E)]) for L in layers}


def independent_alphas(src, overrides, c, seed=0):
    """The same pieces by hand: float model, FloatMoE swap, capture on the same tokens, search."""
    scheme = components(compose("default", overrides))[0]
    model = load_float_model(src)
    weights = {}

    def factory(w13, w2, layer):
        weights[layer] = (w13, w2)
        return FloatMoE(w13, w2)

    rep = swap_moe_experts(model, factory)
    cap = ExpertCapture(
        {e.layer_index: (model.get_submodule(e.path).experts, weights[e.layer_index][0]) for e in rep.entries}
    )
    ids, _ = calibration_tokens(src, model.config.vocab_size, c.tokens, seed, seq_len=c.seq_len)
    with torch.no_grad(), cap.attached():
        model(input_ids=ids.view(-1, c.seq_len), use_cache=False)
    return {
        L: learn_expert_alphas(scheme, *weights[L], cap.layers[L], c.min_tokens, c.policy)[0]
        for L in cap.layers
    }, cap


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_written_alphas_equal_learned_on_same_rows(arch, floats, tmp_path):
    out, result = quantize(floats[arch], tmp_path / "q", CLIP_CT)
    expected, cap = independent_alphas(floats[arch], CLIP_CT, calib())
    layers = sorted(expected)
    assert layers == ([0, 1] if arch == "qwen3_moe" else [1])  # DeepSeek layer 0 is dense
    got = written_alphas(out, layers)
    for L in layers:
        torch.testing.assert_close(got[L], expected[L], rtol=0, atol=0)
        assert (got[L] < 1).any() and (got[L] > 0).all()
    prov = json.loads((out / "config.json").read_text())["quantization_config"]["quantfw"]
    assert prov["alpha_method"] == "grid_search_output_mse"
    c = prov["alpha_calibration"]
    assert c["token_source"] == "pseudo_random" and c["calibration_tokens"] == 512
    assert {int(k): v for k, v in c["coverage"].items()} == {L: cap.layers[L].counts.tolist() for L in layers}
    assert c["tokens"] == sum(sum(v) for v in c["coverage"].values())  # top-k slots routed
    assert c["fallback_experts"] == []


def test_too_few_tokens_policy_ones_listed_in_msmodelslim_metadata(floats, tmp_path):
    c = calib(min_tokens=70)
    out, result = quantize(floats["qwen3_moe"], tmp_path / "q", CLIP_MS, c)
    desc = json.loads((out / "quant_model_description.json").read_text())
    meta = desc["quantfw"]["alpha_calibration"]
    starved = sorted(
        [int(L), e] for L, counts in meta["coverage"].items() for e, n in enumerate(counts) if n < 70
    )
    assert starved and sorted(meta["fallback_experts"]) == starved
    assert meta["policy"] == "ones" and meta["min_tokens"] == 70
    got = written_alphas(out, [0, 1])
    for L, e in starved:
        assert got[L][e].item() == 1.0
    assert desc[ALPHA_KEY.format(L=0, e=0)] == "W4A8_DYNAMIC"  # alpha is listed per tensor too


def test_policy_fail_raises_naming_layer_and_expert(floats):
    scheme = components(compose("default", CLIP_CT))[0]
    with pytest.raises(CalibrationError, match=r"layer \d+ expert \d+: \d+ calibration tokens"):
        calibrate_checkpoint(floats["qwen3_moe"], scheme, calib(min_tokens=70, policy="fail"))


def test_cli_policy_fail_exits_2_one_line(floats, tmp_path):
    r = cli(
        "quantize",
        f"input={floats['qwen3_moe']}",
        f"output={tmp_path / 'q'}",
        *CLIP_CT,
        "calibration.source=model",
        "calibration.tokens=512",
        "calibration.seq_len=128",
        "calibration.min_tokens=70",
        "calibration.policy=fail",
    )
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("quantfw quantize: error:")]
    assert len(err) == 1 and "expert" in err[0] and "min_tokens=70" in err[0]
    assert not (tmp_path / "q").exists()


def test_loading_applies_learned_alphas(floats, tmp_path):
    src = floats["qwen3_moe"]
    learned_dir, _ = quantize(src, tmp_path / "learned", CLIP_CT)
    plain, _ = quantize(src, tmp_path / "ones", CLIP_CT, c=False)
    got = written_alphas(learned_dir, [0, 1])
    learned, ones = from_checkpoint(learned_dir, layer=1), from_checkpoint(plain, layer=1)
    torch.testing.assert_close(learned.w2_alpha, got[1], rtol=0, atol=0)
    assert (ones.w2_alpha == 1).all() and (learned.w2_alpha < 1).any()
    x = hidden_states(64, 512, seed=1)
    w, ids = random_routing(64, 8, 2, seed=2)
    assert not torch.equal(learned(x, w, ids), ones(x, w, ids))


def test_guard_in_calibrate_checkpoint_reverts_layers_it_cannot_confirm(floats):
    """With guard tokens, every clipped layer is judged by the quantized model's NLL; layers that are
    not kept are written with alpha = 1, kept ones with their learned alphas, and the report says so."""
    scheme, fmt, backend = components(compose("default", CLIP_CT))
    src = floats["qwen3_moe"]
    free = calibrate_checkpoint(src, scheme, calib(tokens=512, layerwise=False), 0)
    guarded = calibrate_checkpoint(
        src, scheme, calib(tokens=512, guard_tokens=256, layerwise=False), 0, fmt=fmt, backend=backend
    )
    g = guarded.metadata["guard"]
    assert g["tokens"] == 2 * 127 and g["min_z"] == 3.0 and g["windows"] == 2
    judged = {r["layer"]: r for r in g["layers"]}
    assert set(judged) == {L for L, a in free.alphas.items() if (a < 1).any()}  # every clipped layer
    for L, a in guarded.alphas.items():
        if L in g["kept_layers"]:
            assert judged[L]["kept"] and (a < 1).any()
        else:
            assert a.eq(1).all(), L
    assert guarded.metadata["calibration_tokens"] == 512  # the guard windows are extra
    with pytest.raises(Exception, match="guard_tokens=-1"):
        calibrate_checkpoint(src, scheme, calib(guard_tokens=-1), 0, fmt=fmt, backend=backend)
