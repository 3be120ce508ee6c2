"""The declaration language: `and`/`or` as in Python, if/choose branches in step lists, one
vocabulary for step inputs (`params`), and the one registry type behind every named entry."""

from __future__ import annotations

import pytest
import torch

from quantfw.backends import BACKENDS, get_backend
from quantfw.config.compose import compose
from quantfw.errors import ConfigError
from quantfw.formats.encoders import ENCODERS
from quantfw.layout import expr
from quantfw.quantize.observers import OBSERVERS
from quantfw.registry import Registry
from quantfw.schemes.plan_ops import PLAN_OPS
from quantfw.schemes.scheme import Scheme
from quantfw.transforms import Pipeline, parse_steps
from quantfw.transforms.registry import TRANSFORMS


@pytest.mark.parametrize(
    "text, env, want",
    [
        ("group_size and K/group_size", {"group_size": 0, "K": 256}, 0),
        ("group_size and K/group_size", {"group_size": 64, "K": 256}, 4),
        ("0 or 5", {}, 5),
        ("group_size or 1", {"group_size": 0}, 1),
        ("a or b", {"a": 3, "b": 7}, 3),
        ("1 and 2 and 3", {}, 3),
        ("1 and 0 and 3", {}, 0),
    ],
)
def test_and_or_short_circuit_and_return_an_operand(text, env, want):
    got = expr.evaluate(text, env, "t")
    assert got == want and type(got) is type(want)


def test_or_does_not_evaluate_the_operand_it_does_not_need():
    # `1 or Q`: Q is unknown, so evaluating it would raise
    assert expr.evaluate("1 or Q", {}, "t") == 1
    with pytest.raises(ConfigError, match="unknown name 'Q'"):
        expr.evaluate("0 or Q", {}, "t")


def _env(**flags):
    return lambda role: {"role_is_w13": role == "w13", **flags}


STATE = {"w13_weight": ((2, 4, 6), torch.int8), "w2_weight": ((2, 6, 3), torch.int8)}
BRANCHED = [
    {
        "if": "weight_bits == 4",
        "then": [{"op": "transpose", "params": "weight", "dims": [1, 2]}],
        "else": [{"op": "cast", "params": "weight", "dtype": "float32"}],
    }
]


@pytest.mark.parametrize(
    "bits, want",
    [(4, {"w13_weight": ((2, 6, 4), torch.int8)}), (8, {"w13_weight": ((2, 4, 6), torch.float32)})],
)
def test_if_then_else_runs_exactly_one_branch(bits, want):
    out = Pipeline(parse_steps(BRANCHED, "test")).declare(STATE, _env(weight_bits=bits))
    assert out["w13_weight"] == want["w13_weight"]


def test_choose_picks_the_case_and_a_value_without_case_fails():
    steps = [
        {
            "choose": "weight_bits",
            "cases": {
                4: [{"op": "transpose", "params": "weight", "dims": [1, 2]}],
                8: [{"op": "cast", "params": "weight", "dtype": "float32"}],
            },
        }
    ]
    pipe = Pipeline(parse_steps(steps, "format 'x' load"))
    assert pipe.declare(STATE, _env(weight_bits=4))["w2_weight"] == ((2, 3, 6), torch.int8)
    assert pipe.declare(STATE, _env(weight_bits=8))["w2_weight"] == ((2, 6, 3), torch.float32)
    with pytest.raises(
        ConfigError, match=r"format 'x' load step 1 \(choose weight_bits\): weight_bits=2 matches no case"
    ):
        pipe.declare(STATE, _env(weight_bits=2))
    with_default = [{**steps[0], "default": [{"op": "drop", "params": "weight"}]}]
    assert Pipeline(parse_steps(with_default, "t")).declare(STATE, _env(weight_bits=2)) == {}


def test_nested_step_labels_name_the_branch():
    steps = parse_steps([{"if": "a", "then": [{"op": "drop", "params": "weight"}]}], "format 'x' load")
    assert steps[0].label == "format 'x' load step 1.then.1 (drop)"


@pytest.mark.parametrize(
    "item, message",
    [
        ({"if": "a", "then": [], "when": "b"}, r"step 1: unknown key\(s\) \['when'\] in a branch"),
        ({"if": "a"}, r"step 1: a branch needs 'then'"),
        ({"choose": "a", "cases": []}, r"'cases' must map values to step lists"),
        (
            {"op": "transpose", "args": {"dims": [1, 2]}, "params": "weight"},
            r"key 'args' is not used here: transform steps",
        ),
    ],
)
def test_malformed_steps_are_one_line_errors(item, message):
    with pytest.raises(ConfigError, match=message):
        parse_steps([item], "t")


def test_compute_plans_say_params_and_branch():
    base = compose("default", ["scheme=w4a8"]).scheme
    ops = {
        clip: [s.op for s in Scheme.from_config({**base, "activation_use_clip": clip}).plan()]
        for clip in (True, False)
    }
    assert ops[True] == ["dynamic_quant", "grouped_matmul_a8w4", "swiglu_clip_quant", "grouped_matmul_a8w4"]
    assert ops[False] == [
        "dynamic_quant",
        "grouped_matmul_a8w4",
        "swiglu",
        "dynamic_quant",
        "grouped_matmul_a8w4",
    ]
    old = {**base, "compute": [{"op": "dynamic_quant", "args": {"x": "x"}, "out": "out"}]}
    with pytest.raises(
        ConfigError, match=r"compute\[0\] \(dynamic_quant\): key 'args' is not used here.*'params'"
    ):
        Scheme.from_config(old)


def test_shipped_declarations_pair_no_when_with_its_negation():
    """Alternatives are branches: no step list has `when: X` next to `when: not X`."""
    import yaml

    from quantfw.config.paths import CONF_DIR

    def conditions(steps):
        for s in steps or []:
            if "if" in s or "choose" in s:
                for branch in [
                    s.get("then"),
                    s.get("else"),
                    *(s.get("cases") or {}).values(),
                    s.get("default"),
                ]:
                    yield from conditions(branch)
            elif "when" in s:
                yield str(s["when"]).strip()

    for path in sorted(CONF_DIR.glob("*/*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        for key in ("load", "compute", "post_load"):
            conds = set(conditions(data.get(key)))
            assert not {c for c in conds if f"not {c}" in conds}, f"{path.name} {key}"
        for mode, steps in (data.get("modes") or {}).items():
            assert "weight_bits" not in str([s.get("when") for s in steps or []]), f"{path.name} modes.{mode}"


def test_fast_post_load_is_declared_in_the_backend_yaml():
    fast = get_backend(compose("default", ["backend=torch_fast", "scheme=w8a8"]).backend)
    assert [s.op.name for s in fast.post_load.steps] == [
        "a8w4_residual",
        "int4pack",
        "int4pack_scales",
        "transpose",
    ]
    assert all("modes.fast" in s.label for s in fast.post_load.steps)
    assert get_backend(compose("default", []).backend).post_load.steps == []


def test_every_named_kind_is_one_registry_type_with_its_entry_point_group():
    groups = {r.group for r in (TRANSFORMS, ENCODERS, OBSERVERS, BACKENDS, PLAN_OPS)}
    assert all(isinstance(r, Registry) for r in (TRANSFORMS, ENCODERS, OBSERVERS, BACKENDS, PLAN_OPS))
    assert groups == {
        "quantfw.transforms",
        "quantfw.encoders",
        "quantfw.observers",
        "quantfw.backends",
        "quantfw.plan_ops",
    }
    assert {"torch", "npu", "npu_sim"} <= set(BACKENDS.names())
    with pytest.raises(ValueError, match="observer 'minmax' is already registered"):
        OBSERVERS.add("minmax", OBSERVERS.get("minmax"))
    with pytest.raises(ConfigError, match=r"backend.name: unknown backend 'nope' \(available: .*npu_sim"):
        get_backend({"name": "nope"})


def test_bench_variants_come_from_conf_and_fit_the_group_size():
    from types import SimpleNamespace

    from quantfw.eval.bench import scheme_variants, selected_variants
    from quantfw.layout.spec import Dims

    reference = scheme_variants(Dims(E=64, H=2048, I=1408), 256, recipe_label="mine (recipe)")
    assert reference["w4a8_group"] == (
        "w4a8 g128",
        ["scheme=w4a8", "scheme.group_size=128", "format=msmodelslim"],
    )
    assert scheme_variants(Dims(E=8, H=512, I=256))["w4a8_group"][0] == "w4a8 g256"
    assert reference["recipe"] == ("mine (recipe)", [])
    # default: every declared variant, the recipe's own only when named
    assert selected_variants(SimpleNamespace(schemes=[]), reference) == [
        "w8a8",
        "w4a8_group",
        "w4a8_pc",
        "w4a8_clip",
    ]
    assert selected_variants(SimpleNamespace(schemes=["recipe"]), reference) == ["recipe"]
