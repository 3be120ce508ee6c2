"""backend=npu_sim (the NPU backend's orchestration over a CPU torch_npu emulation) against the torch
reference, the documented argument constraints of every simulated operator, the clip paths, and
backend=npu refusing cleanly without torch_npu."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from quantfw import ops
from quantfw.api import build_layer, components
from quantfw.backends import get_backend
from quantfw.backends.npu import build_npu_backend, load_torch_npu
from quantfw.backends.npu_sim import ACL_FORMAT_FRACTAL_NZ, NpuSim
from quantfw.config.compose import compose
from quantfw.errors import BackendUnavailable, LayoutError
from quantfw.eval import synthetic
from quantfw.eval.metrics import compare, peer_check
from quantfw.integrations.hf import save_tiny_checkpoint
from quantfw.ops.rowmax import rows_split
from quantfw.quantize.checkpoint import quantize_checkpoint
from quantfw.quantize.experts import quantize_experts
from tests.test_ep_layer import _slices_one_by_one

ROOT = Path(__file__).resolve().parents[1]
T = 160
EMPTY_EXPERTS = (2, 6)

SCHEMES = {
    "w8a8 fused": ["scheme=w8a8"],
    "w8a8 unfused": ["scheme=w8a8", "scheme.fused_swiglu_quant=false"],
    "w4a8 g256": ["scheme=w4a8"],
    "w4a8 per-channel": ["scheme=w4a8", "scheme.group_size=0"],
    "w4a8_clip": ["scheme=w4a8_clip", "format=compressed_tensors"],
}


def uneven_routing(t: int, e: int, k: int, seed: int = 3):
    """Skewed top-k routing where EMPTY_EXPERTS receive no token at all."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g) + torch.linspace(3.0, 0.0, e)
    logits[:, list(EMPTY_EXPERTS)] = float("-inf")
    w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def loaded_layer(overrides, backend, alpha=None):
    layer = build_layer(compose("default", [*overrides, f"backend={backend}"]))
    d = layer.dims
    w13, w2 = synthetic.expert_weights(d.E, d.H, d.I, seed=5)
    return layer.load(quantize_experts(layer.scheme, layer.format, w13, w2, alpha=alpha))


@pytest.mark.parametrize("name", list(SCHEMES))
def test_npu_sim_matches_torch_backend(name):
    overrides = SCHEMES[name]
    alpha = torch.linspace(0.35, 1.0, 8) if "clip" in name else None  # clipping really active
    ref = loaded_layer(overrides, "torch", alpha)
    sim = loaded_layer(overrides, "npu_sim", alpha)
    x = synthetic.hidden_states(T, ref.dims.H, seed=11, outlier_scale=60.0).to(torch.bfloat16)
    w, ids = uneven_routing(T, ref.dims.E, 2)
    loads = torch.bincount(ids.flatten(), minlength=ref.dims.E)
    assert all(loads[e] == 0 for e in EMPTY_EXPERTS) and loads.max() > 4 * loads[loads > 0].min()

    want, got = ref(x, w, ids), sim(x, w, ids)
    peer = peer_check(got, want)
    print(f"{name}: peer {peer}, max abs diff {(got.float() - want.float()).abs().max().item():.3g}")
    assert peer["ok"], peer
    assert got.dtype == want.dtype == torch.bfloat16 and torch.isfinite(got.float()).all()
    assert want.float().abs().max() > 0.1  # a real output, not zeros on both sides

    calls = sim.backend.npu.calls
    assert calls[0] == "npu_moe_init_routing_v2" and calls[-1] == "npu_moe_token_unpermute"
    assert calls.count("npu_grouped_matmul") == 2
    assert ("npu_dequant_swiglu_quant" in calls) == (name == "w8a8 fused")
    assert NpuSim.get_npu_format(sim.w13_weight) == ACL_FORMAT_FRACTAL_NZ
    assert NpuSim.get_npu_format(sim.w2_weight) == ACL_FORMAT_FRACTAL_NZ
    if "clip" in name:
        assert sim.backend.notes["swiglu_clip_quant"].startswith("composed")


@pytest.fixture(scope="module")
def tp_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("npu_tp")
    src = save_tiny_checkpoint("qwen3_moe", root / "float", num_layers=1, num_experts=8)
    out = {}
    tp_schemes = {  # the NPU-legal forms that TP can shard (msModelSlim: [H, 16] scale_bias partials)
        **{n: SCHEMES[n] for n in ("w8a8 fused", "w8a8 unfused")},
        "w4a8 per-channel": ["scheme=w4a8", "scheme.group_size=0"],
        "w4a8_clip": ["scheme=w4a8_clip", "format=msmodelslim"],
    }
    for name, overrides in tp_schemes.items():
        s, f, _ = components(compose("default", overrides))
        out[name] = quantize_checkpoint(src, root / name.replace(" ", "_"), s, f, progress=False)
    return out


@pytest.mark.parametrize("name", ["w8a8 fused", "w8a8 unfused", "w4a8 per-channel", "w4a8_clip"])
def test_npu_sim_tensor_parallel_slices_quantize_with_the_whole_rows_amax(tp_ckpts, name):
    """Under TP the fused quant kernels would bound each rank's slice alone; the NPU backend composes
    them around the TP group's row max, so its slices take the torch backend's bounds and outputs."""
    x = synthetic.hidden_states(40, 512, seed=5).to(torch.bfloat16)  # npu_dynamic_quant's dtype
    w, ids = synthetic.random_routing(40, 8, 3, seed=6, skew=3.0)
    bounds = {b: [[], []] for b in ("torch", "npu_sim")}
    got = {b: _slices_one_by_one(tp_ckpts[name], x, w, ids, 2, 2, b, bounds[b]) for b in bounds}
    for r in range(2):  # the same row-max calls with the same slice amaxes, so the same quantization
        assert len(bounds["npu_sim"][r]) == len(bounds["torch"][r]) >= 1
        for a, b in zip(bounds["npu_sim"][r], bounds["torch"][r], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    peer = peer_check(got["npu_sim"], got["torch"])
    assert peer["ok"], peer
    assert compare(got["npu_sim"], got["torch"])["rel_l2"] < 0.01
    assert got["torch"].abs().mean() > 0


def test_npu_sim_native_clip_op_is_refused_under_tensor_parallelism():
    backend = build_npu_backend("npu_sim", NpuSim(has_swiglu_clip_quant=True), {"swiglu_clip": "native"})
    x, counts, alpha = torch.randn(6, 256), torch.tensor([4, 2]), torch.tensor([0.5, 1.0])
    with rows_split(lambda a: a), pytest.raises(BackendUnavailable, match="under tensor parallelism"):
        backend.ops["swiglu_clip_quant"](x, counts, alpha)
    q, s = backend.ops["swiglu_clip_quant"](x, counts, alpha)  # outside TP the native op runs
    assert backend.notes["swiglu_clip_quant"] == "npu_swiglu_clip_quant"


def test_npu_sim_expert_parallel_rank_matches_torch_rank():
    """EP: npu_moe_init_routing_v2's active_expert_range keeps only this rank's experts, exactly as the
    torch dispatch does (slots of the other rank are dropped and combine to zero)."""
    overrides = [*SCHEMES["w4a8 g256"], "ep_size=2", "ep_rank=1"]
    ref, sim = (build_layer(compose("default", [*overrides, f"backend={b}"])) for b in ("torch", "npu_sim"))
    d = ref.dims
    w13, w2 = synthetic.expert_weights(2 * d.E, d.H, d.I, seed=5)
    for layer in (ref, sim):
        layer.load(quantize_experts(layer.scheme, layer.format, w13[d.E :], w2[d.E :]))
    x = synthetic.hidden_states(T, d.H, seed=12).to(torch.bfloat16)
    w, ids = uneven_routing(T, 2 * d.E, 2)
    want, got = ref(x, w, ids), sim(x, w, ids)
    assert sim.expert_offset == d.E == 4
    untouched = ~((ids >= d.E).any(-1))  # tokens routed only to rank 0's experts
    assert untouched.any() and (got[untouched] == 0).all()
    peer = peer_check(got, want)
    assert peer["ok"], peer


# -- argument constraints of the simulated operators ---------------------------------------------
def _a8w4_args(E=2, K=512, N=16, M=6, kgroups=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
    q = torch.randint(-7, 8, (E, K, N), generator=g, dtype=torch.int8)
    packed = ops.pack_int4(q.transpose(1, 2)).transpose(1, 2).contiguous()  # [E, K, N/2]
    weight = ops.int4_weight_to_int32(packed)
    scale = ops.encode_scale_u64(torch.rand(E, kgroups, N, generator=g) * 0.01 + 1e-3)
    bias = torch.randn(E, N, generator=g)
    pts = torch.rand(M, generator=g)
    counts = torch.tensor([4, M - 4] + [0] * (E - 2), dtype=torch.int64)
    return dict(x=[x], weight=[weight], scale=[scale], bias=[bias], per_token_scale=[pts]), counts


def _gmm(sim, args, group_list, **kw):
    call = dict(
        group_list=group_list, split_item=2, group_type=0, group_list_type=1, output_dtype=torch.bfloat16
    )
    call.update(kw)
    return sim.npu_grouped_matmul(args.pop("x"), args.pop("weight"), **args, **call)


def test_gmm_a8w4_valid_call_matches_reference_and_cumsum_equals_counts():
    sim = NpuSim()
    args, counts = _a8w4_args()
    want = ops.grouped_matmul_a8w4(
        args["x"][0], args["weight"][0], args["scale"][0], args["bias"][0], args["per_token_scale"][0], counts
    )
    got_counts = _gmm(sim, dict(args), counts)[0]
    got_cumsum = _gmm(sim, dict(args), counts.cumsum(0), group_list_type=0)[0]
    assert torch.equal(got_counts, want) and torch.equal(got_cumsum, want)


@pytest.mark.parametrize(
    "case, match",
    [
        ("n_not_mult_8", "N % 8"),
        ("k_not_mult_group", "K % group_size"),
        ("group_128", "group size 256"),
        ("no_bias", "'bias' expected a list with the fp32"),
        ("bias_shape", "'bias\\[0\\]' expected shape"),
        ("scale_fp32", "'scale\\[0\\]' expected dtype int64"),
        ("scale_e", "'scale\\[0\\]' expected \\[2, K/group_size, 16\\]"),
        ("no_per_token_scale", "'per_token_scale'"),
        ("cumsum_as_counts", "counts summing to x rows 6"),
        ("counts_as_cumsum", "group_list_type=0"),
        ("group_list_int32", "'group_list' expected dtype int64"),
        ("group_type", "'group_type'"),
        ("two_x", "'x' expected a list with one tensor"),
        ("out_fp32", "'output_dtype'"),
    ],
)
def test_gmm_a8w4_rejects_wrong_calls(case, match):
    sim = NpuSim()
    args, counts = _a8w4_args(kgroups=3 if case == "k_not_mult_group" else 4 if case == "group_128" else 2)
    kw = {}
    if case == "n_not_mult_8":
        args["scale"] = [args["scale"][0][..., :12]]
    elif case == "no_bias":
        args["bias"] = None
    elif case == "bias_shape":
        args["bias"] = [args["bias"][0][:, :8]]
    elif case == "scale_fp32":
        args["scale"] = [ops.decode_scale_u64(args["scale"][0])]
    elif case == "scale_e":
        args["scale"] = [args["scale"][0][:1]]
    elif case == "no_per_token_scale":
        args["per_token_scale"] = None
    elif case == "cumsum_as_counts":
        counts = torch.tensor([4, 6], dtype=torch.int64)
    elif case == "counts_as_cumsum":
        kw["group_list_type"] = 0
        counts = torch.tensor([4, 2], dtype=torch.int64)
    elif case == "group_list_int32":
        counts = counts.to(torch.int32)
    elif case == "group_type":
        kw["group_type"] = -1
    elif case == "two_x":
        args["x"] = args["x"] * 2
    elif case == "out_fp32":
        kw["output_dtype"] = torch.float32
    with pytest.raises(LayoutError, match=f"torch_npu.npu_grouped_matmul: argument .*{match}"):
        _gmm(sim, args, counts, **kw)


def test_gmm_a8w4_k_limit():
    sim = NpuSim()
    K = 18432 + 256
    x = torch.zeros(1, K, dtype=torch.int8)
    w = torch.zeros(1, K, 1, dtype=torch.int32)
    scale = ops.encode_scale_u64(torch.ones(1, 1, 8))
    with pytest.raises(LayoutError, match="K <= 18432"):
        sim.npu_grouped_matmul(
            [x], [w], scale=[scale], bias=[torch.zeros(1, 8)], per_token_scale=[torch.ones(1)],
            group_list=torch.tensor([1]), split_item=2, group_type=0, group_list_type=1,
            output_dtype=torch.bfloat16,
        )  # fmt: skip


def test_gmm_a8w8_raw_accumulator_needs_int32_output():
    sim = NpuSim()
    x = torch.ones(3, 16, dtype=torch.int8)
    w = torch.ones(1, 16, 8, dtype=torch.int8)
    gl = torch.tensor([3])
    acc = sim.npu_grouped_matmul(
        [x], [w], group_list=gl, split_item=2, group_type=0, group_list_type=1, output_dtype=torch.int32
    )[0]
    assert acc.dtype == torch.int32 and int(acc[0, 0]) == 16
    with pytest.raises(LayoutError, match="npu_grouped_matmul: argument 'output_dtype'"):
        sim.npu_grouped_matmul(
            [x],
            [w],
            group_list=gl,
            split_item=2,
            group_type=0,
            group_list_type=1,
            output_dtype=torch.bfloat16,
        )


def _dsq_args(I=256, E=2, M=5):
    x = torch.randint(-1000, 1000, (M, 2 * I), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    return x, dict(
        weight_scale=torch.rand(E, 2 * I) * 1e-3,
        activation_scale=torch.rand(M),
        group_index=torch.tensor([3, 2] + [0] * (E - 2), dtype=torch.int64),
        activate_left=True,
        quant_mode=1,
    )


def test_dequant_swiglu_quant_valid_and_limits():
    sim = NpuSim()
    x, kw = _dsq_args()
    q, s = sim.npu_dequant_swiglu_quant(x, **kw)
    q_ref, s_ref = ops.dequant_swiglu_quant(x, kw["weight_scale"], kw["activation_scale"], kw["group_index"])
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    for I, match in ((10496 + 64, "H = 10560"), (96, "H = 96")):  # too large; not 64-aligned
        x, kw = _dsq_args(I=I, M=2)
        with pytest.raises(LayoutError, match=f"npu_dequant_swiglu_quant: argument 'x' .*{match}"):
            sim.npu_dequant_swiglu_quant(x, **kw)
    x, kw = _dsq_args()
    with pytest.raises(LayoutError, match="argument 'quant_mode'"):
        sim.npu_dequant_swiglu_quant(x, **{**kw, "quant_mode": 0})
    with pytest.raises(LayoutError, match="argument 'weight_scale' expected shape"):
        sim.npu_dequant_swiglu_quant(x, **{**kw, "weight_scale": kw["weight_scale"][:, :256]})


def test_other_ops_reject_wrong_calls():
    sim = NpuSim()
    with pytest.raises(
        LayoutError, match="npu_dynamic_quant: argument 'x' expected dtype float16 or bfloat16"
    ):
        sim.npu_dynamic_quant(torch.ones(2, 8))
    with pytest.raises(LayoutError, match="npu_swiglu: argument 'x' expected an even size"):
        sim.npu_swiglu(torch.ones(2, 7))
    with pytest.raises(
        LayoutError, match="npu_moe_init_routing_v2: argument 'expert_idx' expected dtype int32"
    ):
        sim.npu_moe_init_routing_v2(torch.ones(2, 8), torch.zeros(2, 1, dtype=torch.int64), expert_num=4,
                                    expert_tokens_num_type=1, expert_tokens_num_flag=True)  # fmt: skip
    with pytest.raises(LayoutError, match="npu_moe_init_routing_v2: argument 'expert_idx' expected ids in"):
        sim.npu_moe_init_routing_v2(torch.ones(2, 8), torch.full((2, 1), 4, dtype=torch.int32), expert_num=4,
                                    expert_tokens_num_type=1, expert_tokens_num_flag=True)  # fmt: skip
    with pytest.raises(
        LayoutError, match="npu_moe_token_unpermute: argument 'sorted_indices' expected a permutation"
    ):
        sim.npu_moe_token_unpermute(torch.ones(4, 8), torch.tensor([0, 1, 1, 3], dtype=torch.int32))
    with pytest.raises(LayoutError, match="npu_format_cast: argument 'acl_format'"):
        NpuSim.npu_format_cast(torch.ones(2), 7)


def test_routing_ops_round_trip():
    """init_routing_v2 + token_unpermute with all-ones weights rebuild k * x for in-range slots."""
    sim = NpuSim()
    x = torch.randn(5, 8)
    ids = torch.tensor([[0, 3], [1, 0], [3, 2], [2, 2], [0, 1]], dtype=torch.int32)
    ex, row_idx, counts, _ = sim.npu_moe_init_routing_v2(
        x, ids, active_num=10, expert_num=4, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        active_expert_range=[0, 2],
    )  # fmt: skip
    assert counts.tolist() == [3, 2]
    assert row_idx.tolist() == [0, -1, 3, 1, -1, -1, -1, -1, 2, 4]  # stable by slot within an expert
    assert torch.equal(ex[:5], x[torch.tensor([0, 1, 4, 1, 4])])


# -- the clip op paths ----------------------------------------------------------------------------
def _clip_inputs():
    g = torch.Generator().manual_seed(0)
    x = ((torch.rand(400, 512, generator=g) * 2 - 1) * 1e5).to(torch.bfloat16)  # spec 1.4 peer style
    counts = torch.tensor([10, 120, 0, 200, 30], dtype=torch.int64)  # 40 rows past the sum
    alpha = torch.tensor([0.12, 0.532, 1.0, 0.927, 0.5])
    return x, counts, alpha


def test_composed_clip_equals_reference_and_is_recorded():
    backend = get_backend(compose("default", ["backend=npu_sim"]).backend)
    x, counts, alpha = _clip_inputs()
    q, s = backend.op("swiglu_clip_quant")(x=x, group_index=counts, group_alpha=alpha)
    q_ref, s_ref = ops.swiglu_clip_quant(x, counts, alpha)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert backend.notes["swiglu_clip_quant"].startswith("composed")
    assert "npu_swiglu_clip_quant" not in backend.npu.calls and "npu_swiglu" in backend.npu.calls
    q_plain, _ = ops.dynamic_quant(ops.swiglu(x.float()))
    assert not torch.equal(q[:10], q_plain[:10])  # alpha 0.12 really clips


def test_native_clip_op_used_when_present():
    backend = build_npu_backend("npu_sim", NpuSim(has_swiglu_clip_quant=True), {})
    x, counts, alpha = _clip_inputs()
    q, _ = backend.op("swiglu_clip_quant")(x=x, group_index=counts, group_alpha=alpha)
    assert backend.notes["swiglu_clip_quant"] == "npu_swiglu_clip_quant"
    assert torch.equal(q, ops.swiglu_clip_quant(x, counts, alpha)[0])


def test_native_clip_required_refuses_or_falls_back_only_when_allowed():
    x, counts, alpha = _clip_inputs()
    strict = get_backend(compose("default", ["backend=npu_sim", "backend.swiglu_clip=native"]).backend)
    with pytest.raises(BackendUnavailable, match="no npu_swiglu_clip_quant"):
        strict.op("swiglu_clip_quant")(x=x, group_index=counts, group_alpha=alpha)
    loose = get_backend(
        compose(
            "default",
            ["backend=npu_sim", "backend.swiglu_clip=native", "backend.allow_unclipped_fallback=true"],
        ).backend
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q, _ = loose.op("swiglu_clip_quant")(x=x, group_index=counts, group_alpha=alpha)
    assert any("UNCLIPPED" in str(w.message) for w in caught)
    assert loose.notes["swiglu_clip_quant"].startswith("UNCLIPPED")
    assert torch.equal(q, ops.dynamic_quant(ops.swiglu(x))[0])


# -- backend=npu without torch_npu -----------------------------------------------------------------
def test_npu_backend_unavailable_one_line_via_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "quantfw.cli.main", "plan", "backend=npu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "pip install 'quantfw[npu]'" in lines[0] and "CANN" in lines[0] and "torch_npu" in lines[0]


def test_npu_backend_without_device():
    class FakeTorchNpu:  # importable, but torch.npu.is_available is absent/False on this host
        pass

    with pytest.raises(BackendUnavailable, match="no Ascend NPU device"):
        load_torch_npu(lambda name: FakeTorchNpu())
    with pytest.raises(BackendUnavailable, match="cannot import torch_npu"):
        load_torch_npu(lambda name: (_ for _ in ()).throw(OSError("libascendcl.so: cannot open\nmore")))
