"""Engine profiles: validation, every rule accepting and refusing, `check engine=NAME`, and the
cann_recipes-profile DeepSeek output against the reference converter's layout."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from checkpoint_helpers import cli, quantize
from safetensors.torch import load_file, save_file

from quantfw.engines import available, engine_report, load_profile
from quantfw.engines.facts import CheckpointFacts
from quantfw.engines.profile import parse_profile
from quantfw.engines.report import refused, run_rules
from quantfw.errors import ConfigError
from quantfw.io.loader import open_checkpoint
from quantfw.io.reader import CheckpointReader

pytest.importorskip("transformers")
from engine_helpers import MTP, deepseek_fp8  # noqa: E402

# ------------------------------------------------------------------ profiles as data


def test_shipped_profiles_load_and_cite_sources():
    assert available() == ["cann_recipes", "sglang_npu", "vllm_ascend"]
    for name in available():
        p = load_profile(name)
        assert p.rules and all(re.match(r"^[\w.-]+/[\w.-]+:", r.source) for r in p.rules)
        assert all(re.match(r"^[\w.-]+/[\w.-]+:", s.source) for s in p.plan)


def test_unknown_key_names_file_and_key():
    data = {"name": "x", "rules": [{"id": "a", "check": "holds", "expr": "True", "level": "refuse", "why": "w", "source": "o/r:p", "colour": 1}]}
    with pytest.raises(ConfigError, match=r"^conf/engine/x.yaml: rules\[0\].colour: unknown key"):
        parse_profile(data, "conf/engine/x.yaml")
    with pytest.raises(ConfigError, match=r"x.yaml.extra: unknown key"):
        parse_profile({"name": "x", "rules": [], "extra": 1}, "x.yaml")
    with pytest.raises(ConfigError, match=r"plan\[0\].flags.clip_everything: unknown key"):
        parse_profile(
            {"name": "x", "rules": [], "plan": [{"flags": {"clip_everything": True}, "why": "w", "source": "o/r:p"}]},
            "x.yaml",
        )
    with pytest.raises(ConfigError, match=r"rules\[0\].check: 'exec' is not a registered check"):
        parse_profile({"name": "x", "rules": [{"check": "exec"}]}, "x.yaml")
    with pytest.raises(ConfigError, match=r"rules\[0\].source: expected 'owner/repo:path'"):
        parse_profile({"name": "x", "rules": [{"id": "a", "check": "holds", "expr": "True", "level": "refuse", "why": "w", "source": "a web page"}]}, "x.yaml")


@pytest.mark.parametrize("name", ["../conf/engine/cann_recipes", "quantfw.engines.profile", "CANN", "nope"])
def test_engines_resolve_by_registered_name_only(name):
    with pytest.raises(ConfigError, match=r"is unknown \(available: cann_recipes, sglang_npu, vllm_ascend\)"):
        load_profile(name)


# ------------------------------------------------------------------ every rule accepts and refuses

GROUPS = {
    "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8}},
    "group_1": {"targets": ["MoEGMM"], "weights": {"num_bits": 4}},
}
BASE_ENV = {
    "metadata": "compressed_tensors", "format": "compressed_tensors", "weight_bits": 4, "group_size": 0,
    "clip": True, "has_alpha": True, "H": 512, "I": 256, "E": 8, "tp": 1, "ep": 1, "I_tp": 256,
    "expert_scale_dtype": "uint64", "w2_scale_bias_chunks": 0, "w2_bias": True, "moe_layers": 1,
}
MODULES = {
    "model.layers.0.self_attn.q_a_proj": False,
    "model.layers.0.self_attn.o_proj": True,
    "model.layers.0.mlp.gate_proj": True,
    "model.layers.1.mlp.shared_experts.up_proj": True,
    "model.layers.1.mlp.gate": False,
}
IGNORE = ["model.layers.0.self_attn.q_a_proj", "model.layers.1.mlp.gate"]
MSMODELSLIM = {"metadata": "msmodelslim", "format": "msmodelslim", "clip": False, "has_alpha": False,
               "expert_scale_dtype": "float32", "w2_scale_bias_chunks": 16, "w2_bias": False}
# engine -> (facts it accepts, {rule id: (level, change that breaks exactly that rule)})
CASES = {
    "cann_recipes": ({}, {
        "format": ("refuse", {"metadata": "msmodelslim"}),
        "linear_group": ("refuse", {"groups": {"group_1": GROUPS["group_1"]}}),
        "moe_group": ("refuse", {"groups": {"group_0": GROUPS["group_0"]}}),
        "ignore_list": ("refuse", {"ignore": IGNORE[1:]}),
        "dense_shared_w8a8": ("refuse", {"modules": {"model.layers.0.mlp.gate_proj": False}, "ignore": [*IGNORE, "model.layers.0.mlp.gate_proj"]}),
        "bf16_keep_list": ("refuse", {"modules": {"model.layers.0.self_attn.q_a_proj": True}, "ignore": IGNORE[1:]}),
        "clip_op_dims": ("refuse", {"I": 6144, "I_tp": 6144}),
        "fused_w8a8_swiglu_dims": ("refuse", {"weight_bits": 8, "clip": False, "I": 14336, "I_tp": 14336}),
        "per_channel_int4": ("refuse", {"group_size": 256}),
        "clip_bias_tp": ("refuse", {"tp": 2, "I_tp": 128}),
        "ep_divides": ("refuse", {"ep": 3}),
        "alpha_one": ("differs", {"clip": False, "has_alpha": False}),
    }),
    "sglang_npu": ({**MSMODELSLIM, "group_size": 256}, {
        "format": ("refuse", {"metadata": "gguf"}),
        "moe_group": ("refuse", {"metadata": "compressed_tensors", "groups": {"group_0": GROUPS["group_0"]}}),
        "alpha_ignored": ("differs", {"has_alpha": True}),
        "clip_bias_tp": ("refuse", {"w2_scale_bias_chunks": 0, "w2_bias": True, "tp": 2, "I_tp": 128}),
        "scale_bias_split": ("refuse", {"tp": 32, "I_tp": 8}),
        "ep_divides": ("refuse", {"ep": 3}),
    }),
    "vllm_ascend": (MSMODELSLIM, {
        "format": ("refuse", {"metadata": "compressed_tensors"}),
        "per_group_w4a8": ("refuse", {"group_size": 64}),
        "nz_group_size": ("refuse", {"group_size": 256}),
        "scale_dtype": ("refuse", {"expert_scale_dtype": "float16"}),
        "alpha_ignored": ("differs", {"clip": True}),
        "scale_bias_split": ("refuse", {"tp": 32, "I_tp": 8}),
        "ep_divides": ("refuse", {"ep": 3}),
    }),
}


def _facts(env_change: dict) -> CheckpointFacts:
    change = dict(env_change)
    groups = change.pop("groups", GROUPS)
    ignore = change.pop("ignore", IGNORE)
    modules = {**MODULES, **change.pop("modules", {})}
    return CheckpointFacts({**BASE_ENV, **change}, copy.deepcopy(groups), list(ignore), modules)


@pytest.mark.parametrize("engine", sorted(CASES))
def test_every_rule_accepts_and_refuses(engine):
    profile = load_profile(engine)
    accepted, breakers = CASES[engine]
    assert sorted(breakers) == sorted(r.id for r in profile.rules), "every rule needs a case"
    assert run_rules(profile, _facts(accepted)) == []
    for rule_id, (level, change) in breakers.items():
        found = run_rules(profile, _facts({**accepted, **change}))
        hits = [f for f in found if f.rule == rule_id]
        assert len(hits) == 1 and hits[0].level == level, (rule_id, [f.line() for f in found])
        assert hits[0].source == next(r.source for r in profile.rules if r.id == rule_id)
    # group 256 breaks both vllm-ascend rules: refused per-group and the NZ group sizes
    if engine == "vllm_ascend":
        ids = {f.rule for f in run_rules(profile, _facts({**accepted, "group_size": 256}))}
        assert ids == {"per_group_w4a8", "nz_group_size"}


# ------------------------------------------------------------------ real checkpoints


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    fp8, flt = deepseek_fp8(root)
    return root, fp8, flt


@pytest.fixture(scope="module")
def cann_output(release):
    """The shipped DeepSeek-V3 W4A8-clip recipe's default output of the FP8 release."""
    root, fp8, _ = release
    out = root / "cann"
    r = cli("quantize", "recipe=deepseek_v3_w4a8_clip", f"input={fp8}", f"output={out}")
    assert r.returncode == 0, r.stderr
    assert "engine cann_recipes: every rule holds" in r.stderr
    return out


def test_shipped_deepseek_recipe_loads_in_cann_recipes(cann_output):
    r = cli("check", f"checkpoint={cann_output}", "engine=cann_recipes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "engine cann_recipes (tp 1, ep 1): loads it; 0 silent difference(s)" in r.stdout


def test_check_reports_refusals_and_silent_differences(cann_output):
    r = cli("check", f"checkpoint={cann_output}", "engine=sglang_npu", "tp_size=2")
    assert r.returncode == 2
    assert "REFUSE sglang_npu.clip_bias_tp: the single w2 bias [H] sums over all of K" in r.stdout
    assert "DIFFERS sglang_npu.alpha_ignored: sglang ignores w2_alpha: this checkpoint runs unclipped there" in r.stdout
    assert "(source: sgl-project/sglang:python/sglang/srt/hardware_backend/npu/quantization/" in r.stdout
    assert r.stderr.startswith("quantfw check: error:") and "Traceback" not in r.stderr
    r = cli("check", f"checkpoint={cann_output}", "engine=sglang_npu")  # tp 1: loads, runs unclipped
    assert r.returncode == 0 and "1 silent difference(s)" in r.stdout and "DIFFERS sglang_npu.alpha_ignored" in r.stdout
    r = cli("check", f"checkpoint={cann_output}", "engine=vllm_ascend")
    assert r.returncode == 2 and "REFUSE vllm_ascend.format" in r.stdout


def test_experts_only_output_is_refused_by_cann_recipes(release, tmp_path):
    """Without the engine's linears (~engine: routed experts only) the consumer fails at config
    parsing (no group_0 Linear) and on its non-W8A8 dense / shared MLPs."""
    _, fp8, _ = release
    out = tmp_path / "bare"
    r = cli("quantize", "recipe=deepseek_v3_w4a8_clip", "~engine", f"input={fp8}", f"output={out}")
    assert r.returncode == 0, r.stderr
    findings = engine_report(open_checkpoint(out), "cann_recipes")
    assert refused(findings)
    assert {f.rule for f in findings} == {"linear_group", "dense_shared_w8a8"}
    r = cli("check", f"checkpoint={out}", "engine=cann_recipes")
    assert r.returncode == 2 and "REFUSE cann_recipes.linear_group: config parsing needs config group group_0" in r.stdout


def test_user_targets_win_over_the_profile(release, tmp_path):
    _, fp8, _ = release
    out = tmp_path / "own"
    r = cli("quantize", "recipe=deepseek_v3_w4a8_clip", "quantize.targets=[o_proj]", f"input={fp8}", f"output={out}")
    assert r.returncode == 2  # only o_proj W8A8: the engine would refuse it, and says why
    assert "REFUSE cann_recipes.dense_shared_w8a8" in r.stderr
    types = CheckpointReader(out).config()["quantization_config"]["quantfw"]["linears"]["w8a8"]
    assert types == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj", f"model.layers.{MTP}.self_attn.o_proj"]


def test_engine_format_mismatch_is_one_line(release, tmp_path):
    _, fp8, _ = release
    r = cli("quantize", "recipe=deepseek_v3_w4a8", "engine=cann_recipes", f"input={fp8}", f"output={tmp_path / 'x'}")
    assert r.returncode == 2
    assert r.stderr.strip().endswith(
        "engine=cann_recipes loads format=compressed_tensors, found format=msmodelslim (conf/engine/cann_recipes.yaml: quantize.format)"
    )


def test_msmodelslim_group_and_scale_rules_on_real_files(release, tmp_path):
    _, _, flt = release
    g256 = quantize(flt, tmp_path / "g256", "w4a8")
    pc = quantize(flt, tmp_path / "pc", "w4a8_pc")
    ids = lambda ckpt, engine, **kw: {f.rule for f in engine_report(open_checkpoint(ckpt), engine, **kw)}  # noqa: E731
    assert ids(g256, "vllm_ascend") == {"per_group_w4a8", "nz_group_size"}
    assert ids(g256, "sglang_npu") == set()
    assert ids(g256, "sglang_npu", tp=32) == {"scale_bias_split"}
    assert ids(pc, "vllm_ascend") == set()
    # the same checkpoint with fp16 expert scales: vllm-ascend rejects them
    t = load_file(str(pc / "quant_model_weight_w8a8_dynamic-00001-of-00001.safetensors"))
    for k in [k for k in t if k.endswith(".weight_scale") and ".experts." in k]:
        t[k] = t[k].to(torch.float16)
    save_file(t, str(pc / "quant_model_weight_w8a8_dynamic-00001-of-00001.safetensors"), metadata={"format": "pt"})
    assert ids(pc, "vllm_ascend") == {"scale_dtype"}


# ------------------------------------------------------------------ the reference converter's layout

# What cann-recipes-infer models/deepseek_v3_2_exp/utils/convert_model.py writes for an FP8
# DeepSeek release with quant_type w4a8 and --clip (read from its public source, restated):
# - quantization_config: quant_method compressed-tensors, format int-quantized, status compressed;
#   config group group_0 targets the Linear class (8-bit per-channel symmetric static weights,
#   8-bit per-token dynamic symmetric activations, no activation clip) and group_1 targets the
#   MoEGMM class (the same with 4-bit weights and activation_use_clip true); an ignore list.
# - ignore: per layer q_a_proj, kv_a_proj_with_mqa, kv_b_proj and the indexer's wk / weights_proj,
#   mlp.gate in every MoE layer, eh_proj and shared_head.head in the MTP layer, and lm_head.
#   (It lists the indexer modules for every layer; a DeepSeek-V3 checkpoint has none, so only
#   names that exist are compared.)
# - routed experts (MoE layers, the MTP layer included): weight int8 [N/2, K] (int4 packed along
#   N), weight_scale uint64 [N, 1], bias float32 [N].
# - every other FP8 linear that is not ignored (dense MLPs, shared experts, o_proj, q_b_proj):
#   weight int8 [N, K], weight_scale float32 [N, 1]; nothing else (no offset, no bias).
# - ignored FP8 linears are written bf16; non-FP8 tensors (norms, embeddings, gates, lm_head)
#   pass through.
REFERENCE = {
    "config": {"quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed"},
    "groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False},
                    "input_activations": {"num_bits": 8, "strategy": "token", "dynamic": True, "symmetric": True},
                    "activation_use_clip": False},
        "group_1": {"targets": ["MoEGMM"], "weights": {"num_bits": 4, "strategy": "channel", "symmetric": True, "dynamic": False},
                    "input_activations": {"num_bits": 8, "strategy": "token", "dynamic": True, "symmetric": True},
                    "activation_use_clip": True},
    },
    "ignore_per_layer": ["self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
                         "self_attn.indexer.wk", "self_attn.indexer.weights_proj"],
    "ignore_moe_layer": ["mlp.gate"],
    "ignore_mtp_layer": ["eh_proj", "shared_head.head"],
    "ignore_global": ["lm_head"],
    # safetensors dtype codes as written in the file header
    "expert": {"weight": ("I8", "[N/2, K]"), "weight_scale": ("U64", "[N, 1]"), "bias": ("F32", "[N]")},
    "w8a8": {"weight": ("I8", "[N, K]"), "weight_scale": ("F32", "[N, 1]")},
    "w8a8_modules": [r"\.mlp\.(gate|up|down)_proj$", r"\.shared_experts\.(gate|up|down)_proj$",
                     r"\.self_attn\.(o_proj|q_b_proj)$"],
}


def _header(folder) -> dict:
    """tensor -> (safetensors dtype code, shape) from the file headers (what a consumer reads)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            head = json.loads(fh.read(n))
        out.update({k: (v["dtype"], v["shape"]) for k, v in head.items() if k != "__metadata__"})
    return out


def _shape(spec: str, n: int, k: int) -> list[int]:
    return {"[N/2, K]": [n // 2, k], "[N, 1]": [n, 1], "[N]": [n], "[N, K]": [n, k]}[spec]


def test_cann_output_has_the_reference_converter_layout(release, cann_output):
    _, fp8, _ = release
    src, out = CheckpointReader(fp8), CheckpointReader(cann_output)
    header = _header(cann_output)
    cfg = src.config()
    qc = out.config()["quantization_config"]
    for k, v in REFERENCE["config"].items():
        assert qc[k] == v
    for name, group in REFERENCE["groups"].items():
        got = qc["config_groups"][name]
        assert got["targets"] == group["targets"] and got["activation_use_clip"] == group["activation_use_clip"]
        for part in ("weights", "input_activations"):
            assert {k: got[part][k] for k in group[part]} == group[part], (name, part)
    layers = cfg["num_hidden_layers"] + cfg["num_nextn_predict_layers"]
    ref_ignore = [f"model.layers.{i}.{m}" for i in range(layers) for m in REFERENCE["ignore_per_layer"]]
    ref_ignore += [f"model.layers.{i}.{m}" for i in range(cfg["first_k_dense_replace"], layers) for m in REFERENCE["ignore_moe_layer"]]
    ref_ignore += [f"model.layers.{i}.{m}" for i in range(cfg["num_hidden_layers"], layers) for m in REFERENCE["ignore_mtp_layer"]]
    ref_ignore += REFERENCE["ignore_global"]
    existing = [m for m in ref_ignore if m + ".weight" in src]
    assert len(existing) >= 12 and set(existing) <= set(qc["ignore"])
    for m in existing:  # kept float; FP8 ones as bf16
        info = out.info(m + ".weight")
        assert info.dtype == (torch.bfloat16 if src.info(m + ".weight").dtype == torch.float8_e4m3fn else src.info(m + ".weight").dtype)
    w8a8 = sorted(k[: -len(".weight")] for k in src.keys() if k.endswith(".weight") and any(re.search(p, k[: -len(".weight")]) for p in REFERENCE["w8a8_modules"]))
    assert len(w8a8) == 3 * 3 + 2 * 3  # dense + 2 shared MLPs (3 projs), o_proj + q_b_proj in 3 layers
    for m in w8a8:
        n, k = src.info(m + ".weight").shape
        assert sorted(s for s in out.keys() if s.startswith(m + ".")) == sorted(f"{m}.{s}" for s in REFERENCE["w8a8"])
        for s, (dtype, spec) in REFERENCE["w8a8"].items():
            assert header[f"{m}.{s}"] == (dtype, _shape(spec, n, k)), m
    experts = [k[: -len(".weight")] for k in src.keys() if ".mlp.experts." in k and k.endswith(".weight")]
    assert len(experts) == 2 * 8 * 3  # MoE layer 1 and the MTP layer
    for m in experts:
        n, k = src.info(m + ".weight").shape
        for s, (dtype, spec) in REFERENCE["expert"].items():
            assert header[f"{m}.{s}"] == (dtype, _shape(spec, n, k)), m
