"""Accuracy transforms: exact in float on tiny models of every architecture, and what they buy
once quantized (equalization on a layer with known outlier channels), plus the mixed-precision plan."""

from __future__ import annotations

import pytest
import torch

from quantfw import ops
from quantfw.calibrate import sensitivity
from quantfw.calibrate.equalize import EqualizeReport, apply_updown, equalize_experts, search_updown_scale
from quantfw.calibrate.residual import mlp_readers
from quantfw.calibrate.rotate import random_hadamard, rotate_model
from quantfw.calibrate.smooth import fold_smoothing, search_smooth_scale
from quantfw.config.compose import compose
from quantfw.errors import ConfigError
from quantfw.eval.synthetic import expert_weights, hidden_states, inject_down_proj_outliers
from quantfw.quantize.weights import quantize_weight

ARCHS = ("mixtral", "qwen3_moe", "deepseek_v3", "llama_as_moe")
W4_PC = ["scheme=w4a8", "scheme.group_size=0"]


def _tiny(arch: str):
    pytest.importorskip("transformers")
    if arch != "llama_as_moe":
        from quantfw.integrations.hf import tiny_moe_model

        return tiny_moe_model(arch, seed=3)
    # SmolLM2's architecture (tied embeddings) with its dense MLPs run as 4 experts, top-2 router.
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    for layer in model.model.layers:  # non-trivial norms, so folding them is tested
        layer.input_layernorm.weight.data.uniform_(0.5, 1.5)
        layer.post_attention_layernorm.weight.data.uniform_(0.5, 1.5)
    model.model.norm.weight.data.uniform_(0.5, 1.5)
    return model


def _router_hooks(model, store):
    """Record router logits (the MoE gates' first output), or for the dense-as-MoE oracle router
    the routing it hands to the experts."""
    hooks = []
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if isinstance(gate, torch.nn.Module) and hasattr(layer.mlp, "experts"):
            hooks.append(gate.register_forward_hook(lambda _m, _a, out: store.append(out[0].clone())))
        elif hasattr(layer.mlp, "route"):
            hooks.append(
                layer.mlp.experts.register_forward_pre_hook(lambda _m, a: store.append(a[2].float()))
            )
    return hooks


def _run(model, ids):
    logits = []
    hooks = _router_hooks(model, logits)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    return out, logits


def _check_same(model, ids, ref, ref_router):
    out, router = _run(model, ids)
    assert (out - ref).abs().max().item() < 1e-5
    assert len(router) == len(ref_router)
    for a, b in zip(router, ref_router):
        assert (a - b).abs().max().item() < 1e-5


def _as_moe(model, arch):
    if arch == "llama_as_moe":
        from quantfw.integrations.smollm2 import mlp_to_moe

        mlp_to_moe(model, num_experts=4, top_k=2)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_smoothing_is_exact_in_float(arch):
    model = _tiny(arch)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    ref, ref_router = _run(_as_moe(_tiny(arch), arch), ids)
    g = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        hidden = layer.post_attention_layernorm.weight.shape[0]
        s = torch.rand(hidden, generator=g) * 3 + 0.2
        fold_smoothing(layer.post_attention_layernorm.weight, mlp_readers(layer, hidden), s)
    changed = [layer.post_attention_layernorm.weight for layer in model.model.layers]
    assert all((w - 1).abs().max() > 0.1 for w in changed)  # the fold did change the weights
    _check_same(_as_moe(model, arch), ids, ref, ref_router)


@pytest.mark.parametrize("arch", ARCHS)
def test_rotation_is_exact_in_float(arch):
    model = _tiny(arch)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    ref, ref_router = _run(_as_moe(_tiny(arch), arch), ids)
    before = model.model.embed_tokens.weight.detach().clone()
    q = rotate_model(model, seed=5)
    assert (model.model.embed_tokens.weight - before).abs().max() > 1e-3
    assert torch.allclose(q @ q.T, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-12)
    _check_same(_as_moe(model, arch), ids, ref, ref_router)


def test_random_hadamard_is_orthogonal_for_non_power_of_two():
    for n in (576, 96, 512):
        q = random_hadamard(n, seed=1)
        assert torch.allclose(q @ q.T, torch.eye(n, dtype=q.dtype), atol=1e-12)
    assert not torch.equal(random_hadamard(96, 1), random_hadamard(96, 2))


@pytest.mark.parametrize("arch", ARCHS)
def test_updown_equalization_is_exact_in_float(arch):
    from quantfw.integrations.hf import swap_moe_experts
    from quantfw.moe.reference import FloatMoE

    model = _as_moe(_tiny(arch), arch)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    ref, ref_router = _run(model, ids)
    g = torch.Generator().manual_seed(2)

    def factory(w13, w2, _layer):
        s = torch.rand(w2.shape[0], w2.shape[2], generator=g) * 4 + 0.1
        return FloatMoE(*apply_updown(w13, w2, s))

    if arch == "llama_as_moe":
        for layer in model.model.layers:
            ex = layer.mlp.experts
            layer.mlp.experts = factory(ex.w13, ex.w2, 0)
    else:
        swap_moe_experts(model, factory)
    _check_same(model, ids, ref, ref_router)


def _outlier_expert(scale=32.0):
    w13, w2 = expert_weights(1, 128, 64, seed=4)
    w13, w2 = inject_down_proj_outliers(w13, w2, channels=4, scale=scale)
    return w13, w2


def _layer_error(w13, w2, x, flags):
    """Relative error of the W4A8 expert's down projection, int8 w2 input, on rows x."""
    h = x @ w13[0].T
    ref = ops.swiglu(h) @ w2[0].T
    q, s = ops.dynamic_quant(ops.swiglu(h))
    wq = quantize_weight(w2[0], flags).dequantize()
    return ((q.float() * s.unsqueeze(1) @ wq.T - ref).norm() / ref.norm()).item()


def test_equalization_lowers_quantized_error_with_outlier_channels():
    flags = compose("default", W4_PC).scheme
    w13, w2 = _outlier_expert()
    calib, held = hidden_states(512, 128, seed=1), hidden_states(512, 128, seed=9)
    rep = EqualizeReport()
    e13, e2 = equalize_experts(w13, w2, lambda e: calib, flags, report=rep)
    assert rep.ratio[0] > 0 and rep.error_after[0] < rep.error_before[0]
    before, after = _layer_error(w13, w2, held, flags), _layer_error(e13, e2, held, flags)
    assert after < 0.8 * before  # held-out rows, not only the calibration ones
    # float unchanged
    x = held[:16]
    f = ops.swiglu(x @ w13[0].T) @ w2[0].T
    g = ops.swiglu(x @ e13[0].T) @ e2[0].T
    assert ((f - g).norm() / f.norm()).item() < 1e-5
    assert rep.metadata()["experts_equalized"] == 1


def test_equalization_never_raises_the_calibration_error():
    flags = compose("default", W4_PC).scheme
    w13, w2 = expert_weights(1, 128, 64, seed=6)  # no outliers: r = 0 may win
    x = hidden_states(256, 128, seed=2, outlier_channels=0)
    _, r, before, after = search_updown_scale(w13[0], w2[0], x, flags)
    assert 0.0 <= r <= 1.0 and after <= before


def test_equalization_skips_experts_without_rows():
    flags = compose("default", W4_PC).scheme
    w13, w2 = expert_weights(2, 64, 32, seed=1)
    rep = EqualizeReport()
    x = hidden_states(64, 64)
    e13, e2 = equalize_experts(w13, w2, lambda e: x if e == 0 else None, flags, report=rep)
    assert rep.ratio[1] is None and torch.equal(e13[1], w13[1]) and torch.equal(e2[1], w2[1])


def test_learned_alphas_after_equalization_never_worse_than_alpha_one():
    from quantfw.api import components
    from quantfw.calibrate.experts import ExpertCapture, learn_expert_alphas
    from quantfw.eval.synthetic import random_routing
    from quantfw.moe.reference import FloatMoE

    cfg = compose("default", ["scheme=w4a8_clip"])
    scheme = components(cfg)[0]
    w13, w2 = expert_weights(4, 128, 64, seed=7)
    w13, w2 = inject_down_proj_outliers(w13, w2, channels=4, scale=32)
    x = hidden_states(1024, 128, seed=3)
    w, ids = random_routing(1024, 4, 2)
    w13, w2 = equalize_experts(w13, w2, lambda e: x[(ids == e).any(1)], scheme.flags)
    mod = FloatMoE(w13, w2)
    cap = ExpertCapture({0: (mod, w13)})
    with cap.attached(), torch.no_grad():
        mod(x, w, ids)
    alphas, rows = learn_expert_alphas(scheme, w13, w2, cap.layers[0], min_tokens=16)
    assert alphas.shape == (4,) and bool((alphas <= 1).all())
    learned = [r for r in rows if r["status"] == "learned"]
    assert learned  # every expert has rows: the search ran
    for r in learned:  # a clip is kept only where the layer error is no worse than at alpha = 1
        assert r["layer_error"] <= r["layer_error_at_one"] * (1 + 1e-6)


def test_smoothing_search_lowers_w13_error_on_outlier_inputs():
    flags = compose("default", W4_PC).scheme
    w13, _ = expert_weights(2, 128, 64, seed=8)
    x = hidden_states(512, 128, seed=4, outlier_channels=4, outlier_scale=50)
    s, a, before, after = search_smooth_scale(x, w13, flags)
    assert a is not None and after < before and s.shape == (128,)


def test_sensitivity_plan_respects_the_budget_and_ranks_by_gain_per_byte():
    costs = [
        sensitivity.LayerCost(0, 10.0, 1.0, 100, 200),  # gain 9 / 100 B
        sensitivity.LayerCost(1, 3.0, 2.0, 100, 200),  # gain 1
        sensitivity.LayerCost(2, 8.0, 0.5, 100, 200),  # gain 7.5
        sensitivity.LayerCost(3, 9.0, 1.0, 100, 200),  # gain 8
        sensitivity.LayerCost(5, 1.0, 2.0, 100, 200),  # widening hurts: never chosen
    ]
    assert sensitivity.choose_layers(costs, 250) == [0, 3]
    plan = sensitivity.plan_fragment(costs, 300, "w8a8")
    assert plan["wide_layers"] == [0, 2, 3]
    assert plan["fragment"] == {"layers": {"0": "w8a8", "2-3": "w8a8"}}
    assert plan["extra_bytes"] == 300 and plan["total_bytes"] == 800
    assert plan["error_planned"] == pytest.approx(1.0 + 3.0 + 0.5 + 1.0 + 1.0)
    assert sensitivity.choose_layers(costs, 10_000) == [0, 1, 2, 3]
    assert sensitivity.layer_ranges([7, 0, 1, 2, 5]) == ["0-2", "5", "7"]
    with pytest.raises(ConfigError):
        sensitivity.choose_layers(costs, -1)


# --------------------------------------------------------------------------- in the quantize pipeline

PC_MS = ["scheme=w4a8", "scheme.group_size=0", "format=msmodelslim"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    pytest.importorskip("transformers")
    from quantfw.integrations.hf import save_tiny_checkpoint

    return save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("float") / "qwen3_moe", seed=3)


def _calib(**kw):
    from omegaconf import OmegaConf

    base = dict(tokens=512, seq_len=128, batch_size=4, min_tokens=16, policy="ones", max_rows=1024)
    return OmegaConf.create({**base, **kw})


def test_layerwise_equalization_reaches_the_checkpoint(tiny_ckpt, tmp_path):
    import json

    from quantfw.api import components
    from quantfw.calibrate.model import calibrate_checkpoint
    from quantfw.io.reader import CheckpointReader
    from quantfw.quantize.checkpoint import quantize_checkpoint

    scheme, fmt, _ = components(compose("default", PC_MS))
    res = calibrate_checkpoint(tiny_ckpt, scheme, _calib(equalize=["updown"], equalize_grid=5, tokens=256), 0)
    assert sorted(res.scales) == [0, 1] and res.scales[1].shape == (8, 256)
    assert (res.scales[1] != 1).any()
    out = quantize_checkpoint(
        tiny_ckpt, tmp_path / "eq", scheme, fmt, progress=False, calibration=res,
    )  # fmt: skip
    plain = quantize_checkpoint(tiny_ckpt, tmp_path / "plain", scheme, fmt, progress=False)
    meta = json.loads((out / "quant_model_description.json").read_text())["quantfw"]["equalization"]
    assert meta["equalizers"] == ["updown"] and sum(meta["experts_equalized"].values()) > 0
    a, b = CheckpointReader(out), CheckpointReader(plain)
    key = "model.layers.1.mlp.experts.{e}.{p}.weight"
    moved = [e for e in range(8) if (res.scales[1][e] != 1).any()]
    e = moved[0]
    # per-channel int4 up rows absorb 1/s in their scale: the integers are those of the plain run
    assert torch.equal(a.get(key.format(e=e, p="up_proj")), b.get(key.format(e=e, p="up_proj")))
    assert not torch.equal(a.get(key.format(e=e, p="down_proj")), b.get(key.format(e=e, p="down_proj")))


def test_unknown_equalizer_is_one_line_exit_2(tiny_ckpt, tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "quantfw.cli.main", "quantize", f"input={tiny_ckpt}", f"output={tmp_path / 'q'}",
         *PC_MS, "calibration.source=model", "calibration.tokens=256", "calibration.seq_len=128",
         "calibration.equalize=[awq_magic]"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and "calibration.equalize" in err[0] and "awq_magic" in err[0]
    assert "Traceback" not in r.stderr


def _cli(*args, timeout=600):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "quantfw.cli.main", *args], capture_output=True, text=True, timeout=timeout
    )


def test_sensitivity_command_writes_the_layers_fragment_within_the_budget(tiny_ckpt, tmp_path):
    import json

    import yaml

    from quantfw.config.layer_choice import parse_choices

    common = [
        f"input={tiny_ckpt}",
        *PC_MS,
        "calibration.tokens=256",
        "calibration.seq_len=128",
        "progress=false",
    ]
    r = _cli("sensitivity", *common, "sensitivity.budget=0.6", f"out={tmp_path / 'plan.json'}")
    assert r.returncode == 0, r.stderr
    one = json.loads((tmp_path / "plan.json").read_text())
    per_layer = one["per_layer"]
    assert [c["layer"] for c in per_layer] == [0, 1]
    for c in per_layer:  # W8A8 experts are closer to float than per-channel W4A8 ones, and larger
        assert 0 < c["error_wide"] < c["error_base"] and c["bytes_wide"] > c["bytes_base"]
    assert one["base_bytes"] == sum(c["bytes_base"] for c in per_layer)
    assert one["budget_bytes"] == int(0.6 * one["base_bytes"])
    # each layer's extra bytes are half the base total here: 0.6 fits one layer, the better one per byte
    assert len(one["wide_layers"]) == 1 and one["extra_bytes"] <= one["budget_bytes"]
    best = max(
        per_layer, key=lambda c: (c["error_base"] - c["error_wide"]) / (c["bytes_wide"] - c["bytes_base"])
    )
    assert one["wide_layers"] == [best["layer"]]
    assert one["error_planned"] == pytest.approx(one["error_base"] - best["error_base"] + best["error_wide"])
    r = _cli("sensitivity", *common, "sensitivity.budget=0.6", f"out={tmp_path / 'layers.yaml'}")
    assert r.returncode == 0, r.stderr
    fragment = yaml.safe_load((tmp_path / "layers.yaml").read_text())
    assert parse_choices(fragment["layers"]) == {best["layer"]: "w8a8"}
    assert f"layers={{{best['layer']}:w8a8}}" in r.stdout.splitlines()


def test_sensitivity_unknown_wide_scheme_is_one_line_exit_2(tiny_ckpt):
    r = _cli("sensitivity", f"input={tiny_ckpt}", "sensitivity.wide=w3a3", "calibration.tokens=256")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "sensitivity.wide" in err[0] and "w3a3" in err[0]


def test_quantize_refuses_smoothing_in_one_line(tiny_ckpt, tmp_path):
    r = _cli("quantize", f"input={tiny_ckpt}", f"output={tmp_path / 'q'}", *PC_MS, "calibration.smooth=true")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "calibration.smooth" in err[0] and "expected calibration.smooth=false" in err[0]
    assert not (tmp_path / "q").exists()
