"""Post-load transforms: each op's shape checks, and the upstream W4A8 transpose-order bug."""

import pytest
import torch

from quantfw import ops
from quantfw.errors import ConfigError, LayoutError
from quantfw.formats.format import Format
from quantfw.layout.spec import Dims
from quantfw.moe.layer import MoELayer
from quantfw.quantize.experts import quantize_experts
from quantfw.schemes.scheme import Scheme
from quantfw.transforms import Pipeline, parse_steps

DIMS = Dims(E=2, H=512, I=256)


def _env(role, gs=256):
    return {
        "group_size": gs,
        "weight_bits": 4,
        "activation_use_clip": False,
        "role_is_w13": role == "w13",
        **DIMS.role(role),
    }


def _run(steps, tensors, env_of=_env):
    state = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
    return Pipeline(parse_steps(steps, "test")).run(tensors, state, env_of)


@pytest.mark.parametrize(
    "step, tensor, want_shape, want_dtype",
    [
        (
            {"op": "transpose", "params": "weight", "dims": [1, 2]},
            torch.zeros(2, 256, 512, dtype=torch.int8),
            (2, 512, 256),
            torch.int8,
        ),
        ({"op": "squeeze", "params": "weight", "dim": 2}, torch.zeros(2, 512, 1), (2, 512), torch.float32),
        (
            {"op": "view_int32", "params": "weight"},
            torch.zeros(2, 512, 256, dtype=torch.int8),
            (2, 512, 64),
            torch.int32,
        ),
        ({"op": "encode_u64", "params": "weight"}, torch.ones(2, 1, 512), (2, 1, 512), torch.int64),
        (
            {"op": "cast", "params": "weight", "dtype": "bfloat16"},
            torch.ones(2, 512),
            (2, 512),
            torch.bfloat16,
        ),
        ({"op": "sum_last", "params": "weight"}, torch.ones(2, 512, 16), (2, 512), torch.float32),
        ({"op": "rename", "params": "weight", "out": "scale"}, torch.ones(2, 512), (2, 512), torch.float32),
    ],
)
def test_each_op_declares_and_produces_its_shape(step, tensor, want_shape, want_dtype):
    out = _run([{**step, "roles": ["w13"]}], {"w13_weight": tensor})
    ((name, t),) = out.items()
    assert (tuple(t.shape), t.dtype) == (want_shape, want_dtype)
    state = Pipeline(parse_steps([{**step, "roles": ["w13"]}], "t")).declare(
        {"w13_weight": (tuple(tensor.shape), tensor.dtype)}, _env
    )
    assert state[name] == (want_shape, want_dtype)


@pytest.mark.parametrize(
    "step, tensor, message",
    [
        ({"op": "squeeze", "params": "weight", "dim": 1}, torch.zeros(2, 512, 1), "dim 1 of declared shape"),
        (
            {"op": "view_int32", "params": "weight"},
            torch.zeros(2, 512, 6, dtype=torch.int8),
            "last dim divisible by 4",
        ),
        ({"op": "view_int32", "params": "weight"}, torch.zeros(2, 512, 8), "needs int8"),
        (
            {"op": "encode_u64", "params": "weight"},
            torch.zeros(2, 512, dtype=torch.bfloat16),
            "needs float32",
        ),
    ],
)
def test_ops_refuse_wrong_declared_inputs(step, tensor, message):
    with pytest.raises(LayoutError, match=message):
        _run([{**step, "roles": ["w13"]}], {"w13_weight": tensor})


def test_fused_scale_is_fp16_rounded_and_group_major():
    s1 = torch.rand(2, 512, 1) + 0.5
    s2 = torch.rand(2, 512, 2) + 0.5
    out = _run(
        [{"op": "fuse_scales_fp16", "params": ["s1", "s2"], "out": "scale", "roles": ["w13"]}],
        {"w13_s1": s1, "w13_s2": s2},
    )
    want = (s1 * s2).half().float().transpose(1, 2)
    assert torch.equal(out["w13_scale"], want) and out["w13_scale"].shape == (2, 2, 512)


def test_input_mismatch_names_step_and_param():
    steps = [{"op": "transpose", "params": "weight", "dims": [1, 2], "roles": ["w13"]}]
    state = {"w13_weight": ((2, 256, 512), torch.int8)}
    with pytest.raises(
        LayoutError,
        match=r"test step 1 \(transpose\): input w13_weight is \[2, 512, 256\] int8, declared \[2, 256, 512\] int8",
    ):
        Pipeline(parse_steps(steps, "test")).run(
            {"w13_weight": torch.zeros(2, 512, 256, dtype=torch.int8)}, state, _env
        )


def test_unknown_transform_and_key():
    with pytest.raises(ConfigError, match=r"unknown transform 'tranpose' \(available: .*transpose"):
        parse_steps([{"op": "tranpose", "params": "weight"}], "format 'x' load")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['dim'\]"):
        parse_steps([{"op": "transpose", "params": "weight", "dim": 1}], "format 'x' load")


# ---- The upstream bug (spec section 3): moving the transpose after the scale fusion made the
# fusion read K and N from the untransposed weight. Here the fusion never reads the weight: dims
# come from the layout, so the reordered pipeline gives the same runtime tensors.


def _w4_group_steps(load):
    """msModelSlim's load steps that apply to per-group W4A8, as one flat list (the `choose`
    weight_bits case 4, the `if: group_size` then-branch)."""
    out = []
    for s in load:
        if "choose" in s:
            out += _w4_group_steps(s["cases"][4])
        elif "if" in s:
            out += _w4_group_steps(s["then"])
        else:
            out.append(s)
    return out


def _w4a8_msmodelslim(load_steps):
    import yaml

    from quantfw.config.compose import CONF_DIR

    fmt_cfg = yaml.safe_load((CONF_DIR / "format" / "msmodelslim.yaml").read_text())
    base = yaml.safe_load((CONF_DIR / "scheme" / "w4a8.yaml").read_text())
    scheme = Scheme.from_config(base)
    if load_steps is not None:
        fmt_cfg["load"] = load_steps(_w4_group_steps(fmt_cfg["load"]))
    return scheme, Format.from_config(fmt_cfg)


def test_transpose_order_cannot_break_scale_fusion():
    torch.manual_seed(0)
    dims = Dims(E=2, H=512, I=512)  # w13: N=1024 != K=512, so a K/N swap would show
    w13, w2 = torch.randn(2, 1024, 512) * 0.02, torch.randn(2, 512, 512) * 0.02

    def reorder(steps):  # transpose + view moved to the end, after the fusion and encoding
        moved = [s for s in steps if s["op"] in ("transpose", "view_int32") and s["params"] == "weight"]
        return [s for s in steps if s not in moved] + moved

    results = []
    for variant in (None, reorder):
        scheme, fmt = _w4a8_msmodelslim(variant)
        from quantfw.backends import get_backend

        layer = MoELayer(scheme, fmt, get_backend("torch"), dims)
        layer.load(quantize_experts(scheme, fmt, w13, w2))
        results.append(layer.runtime_tensors())
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name
    assert results[0]["w13_scale"].shape == (2, 512 // 256, 1024)


def test_a_step_that_reads_the_wrong_axis_fails_at_plan_time():
    """A view_int32 before the transpose would pack along K: caught from declarations alone."""

    def view_first(steps):
        view = next(s for s in steps if s["op"] == "view_int32")
        return [view] + [s for s in steps if s is not view]

    scheme, fmt = _w4a8_msmodelslim(view_first)
    from quantfw.backends import get_backend

    with pytest.raises(
        LayoutError,
        match=r"produces w13_weight \[2, 128, 256\] int32, the scheme declares w13_weight \[2, 512, 64\] int32",
    ):
        MoELayer(scheme, fmt, get_backend("torch"), Dims(E=2, H=512, I=256))


def test_int32_view_matches_the_on_disk_packing():
    q = torch.randint(-7, 8, (2, 64, 32), dtype=torch.int8)  # [E, N, K]
    packed = ops.pack_int4(q)  # [E, N/2, K] on disk
    out = _run(
        [
            {"op": "transpose", "params": "weight", "dims": [1, 2], "roles": ["w13"]},
            {"op": "view_int32", "params": "weight", "roles": ["w13"]},
        ],
        {"w13_weight": packed},
    )
    assert torch.equal(ops.unpack_int4_int32(out["w13_weight"]), q.transpose(1, 2))
