"""Interop: a W4A8 checkpoint written by the compressed-tensors library itself in its
"pack-quantized" int4 format (what llm-compressor saves) loads through quantfw's loader.

The library quantizes and packs per-expert nn.Linear modules (llm-compressor's MoE layout,
`...experts.e.gate_proj.weight_packed`), its ModelCompressor writes config.json's
quantization_config; scales come from the library's own min-max qparams (what llm-compressor's
default observer computes)."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_helpers import quantize
from safetensors.torch import save_file
from torch import nn

from quantfw import from_checkpoint
from quantfw.errors import CheckpointError
from quantfw.eval.metrics import compare
from quantfw.eval.synthetic import hidden_states, random_routing
from quantfw.io.loader import check, open_checkpoint
from quantfw.moe.reference import FloatMoE
from quantfw.ops import decode_scale_u64, unpack_int4_int32

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils.helpers import calculate_qparams  # noqa: E402

H, I, E = 512, 256, 8
PROJ = ("gate_proj", "up_proj", "down_proj")


def _weights(seed=0, exact=False):
    """Float experts w13 [E, 2I, H], w2 [E, H, I]. exact: w = q * s with q in -7..7 reaching +-7
    and s with 4 mantissa bits, so per-channel scales amax/7 are exact for every quantizer."""
    g = torch.Generator().manual_seed(seed)

    def one(n, k):
        if not exact:
            return torch.randn(E, n, k, generator=g) * 0.02
        q = torch.randint(-7, 8, (E, n, k), generator=g).float()
        q[..., 0] = 7
        s = (1 + torch.randint(0, 16, (E, n, 1), generator=g).float() / 16) * 2.0**-9
        return q * s

    return one(2 * I, H), one(H, I)


def library_minmax_scale(w, args):
    """The library's qparams from per-channel / per-group min and max (llm-compressor's default
    min-max observer feeds calculate_qparams the same way)."""
    if args.strategy == "group":
        w = w.unflatten(-1, (w.shape[-1] // args.group_size, args.group_size))
        lo, hi = w.amin(-1), w.amax(-1)
    else:
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    return calculate_qparams(lo, hi, args)[0]


def ct_checkpoint(
    folder,
    w13,
    w2,
    strategy="group",
    group_size=128,
    acts=True,
    dtype=torch.bfloat16,
    scale_fn=library_minmax_scale,
):
    """Quantize and save with compressed-tensors: per-expert Linear modules, pack-quantized."""
    root = nn.Module()
    root.model = nn.Module()
    layer = nn.Module()
    root.model.layers = nn.ModuleList([layer])
    layer.mlp = nn.Module()
    layer.mlp.gate = nn.Linear(H, E, bias=False)
    layer.mlp.experts = nn.ModuleList()
    for e in range(E):
        ex = nn.Module()
        for name, w in zip(PROJ, (w13[e, :I], w13[e, I:], w2[e])):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data.copy_(w)
            setattr(ex, name, lin)
        layer.mlp.experts.append(ex)
    root.to(dtype)
    wargs = QuantizationArgs(
        num_bits=4,
        type="int",
        symmetric=True,
        strategy=strategy,
        group_size=group_size if strategy == "group" else None,
    )
    aargs = (
        QuantizationArgs(num_bits=8, type="int", strategy="token", dynamic=True, symmetric=True)
        if acts
        else None
    )
    cfg = QuantizationConfig(
        config_groups={
            "group_0": QuantizationScheme(targets=["Linear"], weights=wargs, input_activations=aargs)
        },
        ignore=["re:.*mlp.gate$"],
    )
    apply_quantization_config(root, cfg)
    for _, m in root.named_modules():
        if hasattr(m, "weight_scale"):
            scale = scale_fn(m.weight.data, m.quantization_scheme.weights)
            m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
    # W4A16 infers pack-quantized; W4A8 would infer int-quantized, so force it as llm-compressor's
    # save_pretrained(quantization_format="pack-quantized") does.
    comp = ModelCompressor.from_pretrained_model(root, quantization_format="pack-quantized")
    comp.compress_model(root)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in root.state_dict().items()}, str(folder / "model.safetensors"))
    config = {"model_type": "qwen3_moe", "hidden_size": H, "moe_intermediate_size": I, "num_experts": E}
    (folder / "config.json").write_text(json.dumps(config))
    comp.update_config(str(folder))
    return folder


def float_checkpoint(folder, w13, w2):
    folder.mkdir(parents=True)
    ts = {}
    for e in range(E):
        p = f"model.layers.0.mlp.experts.{e}"
        ts[f"{p}.gate_proj.weight"], ts[f"{p}.up_proj.weight"] = w13[e, :I], w13[e, I:]
        ts[f"{p}.down_proj.weight"] = w2[e]
    ts["model.layers.0.mlp.gate.weight"] = torch.randn(E, H) * 0.02
    save_file({k: v.contiguous() for k, v in ts.items()}, str(folder / "model.safetensors"))
    config = {"model_type": "qwen3_moe", "hidden_size": H, "moe_intermediate_size": I, "num_experts": E}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _inputs(T=96):
    x = hidden_states(T, H)
    w, ids = random_routing(T, E, 2)
    return x, w, ids


@pytest.mark.parametrize("strategy", ["group", "channel"])
def test_library_written_pack_quantized_loads_and_matches_the_library(tmp_path, strategy):
    w13, w2 = _weights()
    folder = ct_checkpoint(tmp_path / "ct", w13, w2, strategy=strategy, acts=strategy == "channel")
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    op = open_checkpoint(folder)
    assert op.scheme.name == "w4a8" and op.fmt.name == "pack_quantized"
    assert op.scheme.flags["group_size"] == (128 if strategy == "group" else 0)
    assert check(op) == []
    layer = from_checkpoint(folder)
    rt = layer.runtime_tensors()
    # The library's own view of its file: ints via its unpacker, scales as stored.
    from safetensors.torch import load_file

    sd = load_file(str(folder / "model.safetensors"))
    for role, projs in (("w13", PROJ[:2]), ("w2", PROJ[2:])):
        q_lib = torch.stack(
            [
                torch.cat(
                    [
                        unpack_from_int32(
                            sd[f"model.layers.0.mlp.experts.{e}.{p}.weight_packed"],
                            4,
                            sd[f"model.layers.0.mlp.experts.{e}.{p}.weight_shape"],
                        )
                        for p in projs
                    ]
                )
                for e in range(E)
            ]
        )
        s_lib = torch.stack(
            [
                torch.cat([sd[f"model.layers.0.mlp.experts.{e}.{p}.weight_scale"] for p in projs])
                for e in range(E)
            ]
        ).float()
        q = unpack_int4_int32(rt[f"{role}_weight"]).transpose(1, 2)  # [E, N, K]
        S = decode_scale_u64(rt[f"{role}_scale"]).transpose(1, 2)  # [E, N, K/G or 1]
        assert torch.equal(q, q_lib) and torch.equal(S, s_lib)
        assert int(q_lib.min()) >= -8 and int(q_lib.max()) <= 7 and int((q_lib == -8).sum()) >= 0
        K = q.shape[-1]
        deq = q.float() * torch.repeat_interleave(S, K // S.shape[-1], dim=-1)
        assert torch.allclose(rt[f"{role}_bias"], 8 * deq.sum(-1), rtol=1e-5, atol=1e-6)
    x, w, ids = _inputs()
    m = compare(layer(x, w, ids), FloatMoE(w13, w2)(x, w, ids))
    assert m["rel_l2"] < (0.20 if strategy == "group" else 0.30) and m["cosine"] > 0.95, m


def test_equals_own_msmodelslim_path_where_quantized_values_coincide(tmp_path):
    """Per-channel weights on an exact int4 grid (|q| <= 7, s with 4 mantissa bits). With its
    default min-max scale (amax/8, q in -8..7) the library's ints differ from ours (amax/7); with
    the scale set to amax/7 before its compressor runs they coincide, and then the library's file
    and quantfw's own quantize -> msmodelslim checkpoint load to identical runtime tensors and
    identical layer outputs."""
    w13, w2 = _weights(exact=True)
    own = quantize(float_checkpoint(tmp_path / "float", w13, w2), tmp_path / "own", "w4a8_pc")
    ours = from_checkpoint(own)
    default = from_checkpoint(ct_checkpoint(tmp_path / "ct8", w13, w2, "channel", dtype=torch.float32))
    assert not torch.equal(default.runtime_tensors()["w13_weight"], ours.runtime_tensors()["w13_weight"])

    def amax_over_7(w, args):
        return w.abs().amax(-1, keepdim=True) / 7

    lib = from_checkpoint(
        ct_checkpoint(tmp_path / "ct7", w13, w2, "channel", dtype=torch.float32, scale_fn=amax_over_7)
    )
    a, b = lib.runtime_tensors(), ours.runtime_tensors()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x, w, ids = _inputs()
    assert torch.equal(lib(x, w, ids), ours(x, w, ids))


def test_tp2_sums_to_tp1(tmp_path):
    w13, w2 = _weights(seed=1)
    folder = ct_checkpoint(tmp_path / "ct", w13, w2, strategy="group", acts=False)
    x, w, ids = _inputs()
    full = from_checkpoint(folder)(x, w, ids)
    summed = sum(from_checkpoint(folder, tp_rank=r, tp_size=2)(x, w, ids).float() for r in range(2))
    m = compare(summed, full)
    assert m["rel_l2"] < 0.02, m


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False), "symmetric=False"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=8), "num_bits=8"),
        (lambda q: q.update(ignore=["re:.*experts.*"]), "ignores routed expert"),
    ],
)
def test_unsupported_pack_quantized_configs_refused_in_one_line(tmp_path, edit, needle):
    w13, w2 = _weights()
    folder = ct_checkpoint(tmp_path / "ct", w13, w2, acts=False)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=needle) as e:
        from_checkpoint(folder)
    assert "\n" not in str(e.value) and "config.json" in str(e.value)


def test_pack_quantized_is_read_only_for_the_quantizer(tmp_path):
    from quantfw.api import components
    from quantfw.config.compose import compose
    from quantfw.errors import ConfigError
    from quantfw.quantize.checkpoint import quantize_checkpoint

    w13, w2 = _weights()
    src = float_checkpoint(tmp_path / "float", w13, w2)
    s, f, _ = components(
        compose("default", ["scheme=w4a8", "scheme.group_size=128", "format=pack_quantized"])
    )
    with pytest.raises(ConfigError, match="read-only"):
        quantize_checkpoint(src, tmp_path / "out", s, f, progress=False)
    assert not (tmp_path / "out").exists()
