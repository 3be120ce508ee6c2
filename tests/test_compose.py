"""Hydra composition of every shipped recipe, flag overrides, and rejected input."""

import textwrap

import pytest

from quantfw.api import build_layer, layer_dims
from quantfw.config.compose import available
from quantfw.errors import ConfigError
from quantfw.schemes.scheme import Scheme


@pytest.mark.parametrize("recipe", available("recipe"))
def test_every_recipe_composes_and_plans(compose, recipe):
    cfg = compose(recipe)
    layer = build_layer(cfg)  # declared layouts instantiate for the real dims; post-load proven on shapes
    assert layer.runtime_specs
    assert layer_dims(cfg).H == cfg.model.hidden_size


def test_real_model_dims(compose):
    ds = compose("deepseek_v3_w4a8_clip").model
    assert (ds.hidden_size, ds.moe_intermediate_size, ds.num_experts, ds.top_k) == (7168, 2048, 256, 8)
    assert ds.num_layers - ds.first_moe_layer == 58 and ds.routing == "grouped_sigmoid"
    q = compose("qwen3_235b_a22b_w4a8").model
    assert (q.hidden_size, q.moe_intermediate_size, q.num_experts, q.num_layers) == (4096, 1536, 128, 94)
    m = compose("mixtral_8x7b_w8a8")
    assert (m.model.moe_intermediate_size, m.model.proj_names["gate"]) == (14336, "w1")
    assert m.scheme.fused_swiglu_quant is False


def test_override_equivalence(compose):
    """scheme=w4a8 group_size=0 activation_use_clip=true IS scheme=w4a8_clip (names aside)."""
    a = Scheme.from_config(
        compose("default", ["scheme=w4a8", "scheme.group_size=0", "scheme.activation_use_clip=true"]).scheme
    )
    b = Scheme.from_config(compose("default", ["scheme=w4a8_clip"]).scheme)
    assert a.name != b.name
    assert a.signature() == b.signature()
    # and the layouts they build are identical, including the alpha parameter
    cfg_a = compose("default", ["scheme=w4a8", "scheme.group_size=0", "scheme.activation_use_clip=true"])
    cfg_b = compose("default", ["scheme=w4a8_clip"])
    assert build_layer(cfg_a).runtime_specs == build_layer(cfg_b).runtime_specs
    assert "w2_alpha" in build_layer(cfg_b).runtime_specs


def test_flags_change_the_layout_coherently(compose):
    specs = build_layer(
        compose("default", ["scheme=w4a8_clip", "scheme.activation_use_clip=false"])
    ).runtime_specs
    assert "w2_alpha" not in specs
    g = build_layer(compose("default", ["scheme=w4a8", "scheme.group_size=128"])).runtime_specs
    assert g["w13_scale"].shape == (8, 512 // 128, 512) and g["w2_scale"].shape == (8, 256 // 128, 512)
    plan = [s.op for s in build_layer(compose("default", ["scheme=w4a8_clip"])).plan]
    assert "swiglu_clip_quant" in plan and "swiglu" not in plan


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["scheme=w9"], r"Could not find 'scheme/w9'.*available scheme: w4a8, w4a8_clip, w8a8"),
        (["model=nope"], r"available model: deepseek_v3, .*tiny"),
        (["scheme.group_size=abc"], r"could not be converted to Integer \(key: scheme.group_size\)"),
        (["+scheme.grop_size=128"], r"Key 'grop_size' not in 'SchemeConfig' \(key: scheme.grop_size\)"),
        (["scheme.nope=1"], r"scheme.nope"),
        (["scheme.group_size=100"], r"group_size=100 does not divide w13 K=512 and w2 K=256"),
        (
            ["scheme=w4a8", "format=compressed_tensors"],
            r"format 'compressed_tensors'.*stores int4 per channel only",
        ),
        (["backend=cuda"], r"available backend:"),
        (["scheme.weight_bits=3"], r"weight_bits=3 \(allowed: 4, 8\)"),
    ],
)
def test_bad_overrides_name_the_key(compose, overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose("default", overrides)


def test_unknown_recipe_lists_available(compose):
    with pytest.raises(ConfigError, match=r"unknown recipe 'nope' \(available: .*deepseek_v3_w4a8_clip"):
        compose("nope")


def _user_dir(tmp_path, scheme_yaml):
    (tmp_path / "scheme").mkdir()
    (tmp_path / "scheme" / "broken.yaml").write_text(textwrap.dedent(scheme_yaml))
    return tmp_path


@pytest.mark.parametrize(
    "body, message",
    [
        (
            """
            defaults: [w4a8, _self_]
            name: broken
            runtime:
              weight: {shape: [E, K, N/8], dtype: int33}
            """,
            r"scheme 'broken' \(scheme/broken.yaml\) runtime: weight.dtype: unknown dtype 'int33'",
        ),
        (
            """
            defaults: [w4a8, _self_]
            name: broken
            runtime:
              bias: {shape: [E, N], dtype: float32, sharding: rows}
            """,
            r"runtime: bias: unknown key\(s\) \['sharding'\]",
        ),
        (
            """
            defaults: [w4a8, _self_]
            name: broken
            compute:
              - {op: dynamic_quant, params: {x: x}, out: [xq, xs]}
              - {op: grouped_matmul_a8w4, params: {x: xq, weight: w13_wieght}, out: out}
            """,
            r"compute\[1\] \(grouped_matmul_a8w4\): argument weight=w13_wieght is not defined",
        ),
    ],
)
def test_malformed_declaration_names_file_and_key(compose, tmp_path, body, message):
    d = _user_dir(tmp_path, body)
    with pytest.raises(ConfigError, match=message):
        build_layer(compose("default", ["scheme=broken"], config_dirs=[d]))


def test_user_recipe_for_a_new_model(compose, tmp_path):
    """A user folder adds a model and a recipe that composes a shipped recipe with it."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my_moe.yaml").write_text(
        "name: my_moe\nhidden_size: 1024\nmoe_intermediate_size: 512\nnum_experts: 16\ntop_k: 4\nnum_layers: 12\n"
    )
    (tmp_path / "my_recipe.yaml").write_text(
        "defaults:\n  - deepseek_v3_w4a8\n  - override model: my_moe\n  - _self_\n"
    )
    cfg = compose("my_recipe", ["scheme.group_size=128"], config_dirs=[tmp_path])
    assert cfg.model.name == "my_moe" and cfg.scheme.name == "w4a8" and cfg.scheme.group_size == 128
    assert build_layer(cfg).runtime_specs["w2_scale"].shape == (16, 512 // 128, 1024)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+hydra.callbacks.x._target_=os.system"], "hydra.callbacks: recipes may not name code to run"),
        (
            ["+hydra.job_logging.handlers.h.class=subprocess.Popen"],
            r"hydra.job_logging.handlers.h.class=subprocess.Popen",
        ),
        (["+hydra.job_logging.handlers.h.()=os.system"], r"hydra.job_logging.handlers.h.\(\)"),
    ],
)
def test_recipes_cannot_make_hydra_run_code(compose, overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose("default", overrides)


def test_user_recipe_cannot_swap_the_launcher(compose, tmp_path):
    (tmp_path / "hydra" / "launcher").mkdir(parents=True)
    (tmp_path / "hydra" / "launcher" / "evil.yaml").write_text("_target_: os.system\n")
    (tmp_path / "evil.yaml").write_text(
        "defaults:\n  - quantfw\n  - override hydra/launcher: evil\n  - _self_\n"
    )
    with pytest.raises(ConfigError, match=r"hydra.launcher._target_=os.system: recipes may not name code"):
        compose("evil", config_dirs=[tmp_path])
