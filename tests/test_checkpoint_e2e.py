"""End to end on tiny transformers checkpoints: quantize -> check -> load -> forward vs float,
metadata, bit-exact written tensors, EP/TP loading."""

import json

import pytest
import torch
from checkpoint_helpers import cli, float_experts, quantize

from quantfw import from_checkpoint
from quantfw.errors import CheckpointError
from quantfw.eval.metrics import compare
from quantfw.eval.synthetic import hidden_states, random_routing
from quantfw.integrations.hf import save_tiny_checkpoint
from quantfw.io.loader import check, open_checkpoint
from quantfw.io.reader import CheckpointReader
from quantfw.moe.reference import FloatMoE

ARCHS = ("mixtral", "qwen3_moe", "deepseek_v3")
# rel_l2 of the layer output vs fp32 float experts on tokens with 30x outlier channels: int8
# per-token activations alone cost ~5%; int4 weights (7 levels per sign) ~22-24%.
LIMITS = {"w8a8": 0.08, "w4a8": 0.30, "clip": 0.30}
MOE_LAYER = {"mixtral": 0, "qwen3_moe": 0, "deepseek_v3": 1}  # DeepSeek layer 0 is dense


@pytest.fixture(scope="module")
def float_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("float")
    return {a: save_tiny_checkpoint(a, root / a) for a in ARCHS}


@pytest.fixture(scope="module")
def quantized(float_ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {(a, s): quantize(float_ckpts[a], root / f"{a}_{s}", s) for a in ARCHS for s in LIMITS}


def _inputs(H, E, T=96):
    x = hidden_states(T, H)
    w, ids = random_routing(T, E, 2)
    return x, w, ids


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", list(LIMITS))
def test_quantize_check_load_forward(arch, scheme, float_ckpts, quantized):
    out = quantized[arch, scheme]
    op = open_checkpoint(out)
    assert check(op) == []
    assert op.scheme.flags["weight_bits"] == (8 if scheme == "w8a8" else 4)
    assert op.scheme.flags.get("activation_use_clip") == (scheme == "clip")
    layers = list(op.prefixes)
    assert MOE_LAYER[arch] == layers[0] and len(layers) == (1 if arch == "deepseek_v3" else 2)
    L = layers[-1]
    layer = from_checkpoint(out, layer=L)
    w13, w2 = float_experts(CheckpointReader(float_ckpts[arch]), L)
    x, w, ids = _inputs(w13.shape[2], w13.shape[0])
    m = compare(layer(x, w, ids), FloatMoE(w13, w2)(x, w, ids))
    assert m["rel_l2"] < LIMITS[scheme], m
    assert m["cosine"] > 0.95, m
    # Non-expert tensors pass through bit for bit.
    src, dst = CheckpointReader(float_ckpts[arch]), CheckpointReader(out)
    for k in src.keys():
        if ".experts." not in k:
            assert torch.equal(src.get(k), dst.get(k)), k


def test_metadata_msmodelslim(quantized):
    out = quantized["qwen3_moe", "w4a8"]
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc["version"] == "1.0.0" and desc["group_size"] == 256
    assert desc["model.layers.0.mlp.experts.3.up_proj.weight_scale_second"] == "W4A8_DYNAMIC"
    assert desc["model.layers.0.mlp.gate.weight"] == "FLOAT"
    assert desc["model.embed_tokens.weight"] == "FLOAT"
    assert desc["quantfw"]["scheme"] == "w4a8" and desc["quantfw"]["format"] == "msmodelslim"
    index = json.loads((out / "quant_model_weight_w8a8_dynamic.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {k for k in desc if "." in k}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and "quantization_config" not in cfg
    w8 = json.loads((quantized["mixtral", "w8a8"] / "quant_model_description.json").read_text())
    assert w8["model.layers.1.block_sparse_moe.experts.0.w3.weight"] == "W8A8_DYNAMIC"


def test_metadata_compressed_tensors(quantized):
    cfg = json.loads((quantized["deepseek_v3", "clip"] / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    g = qc["config_groups"]["group_1"]
    assert g["targets"] == ["MoEGMM"] and g["activation_use_clip"] is True
    assert g["weights"] == {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "dynamic": False,
        "strategy": "channel",
    }
    assert g["input_activations"]["strategy"] == "token" and g["input_activations"]["dynamic"] is True
    assert "model.layers.1.mlp.gate" in qc["ignore"] and "lm_head" in qc["ignore"]
    assert "model.layers.1.mlp.shared_experts.down_proj" in qc["ignore"]
    assert qc["quantfw"]["alpha_method"].startswith("none")
    assert (quantized["deepseek_v3", "clip"] / "model.safetensors.index.json").is_file()


# ------------------------------------------------------------------------ bit-exact vs the spec


def _pack_spec(q):  # spec 1.6: low nibble = even output row, two's complement
    lo, hi = q[0::2].to(torch.int32) & 0xF, q[1::2].to(torch.int32) & 0xF
    v = lo | (hi << 4)
    return torch.where(v > 127, v - 256, v).to(torch.int8)


def test_written_tensors_bit_exact_clip(float_ckpts, quantized):
    src, dst = CheckpointReader(float_ckpts["qwen3_moe"]), CheckpointReader(quantized["qwen3_moe", "clip"])
    for proj in ("gate_proj", "down_proj"):
        base = f"model.layers.1.mlp.experts.5.{proj}"
        w = src.get(f"{base}.weight").float()
        s = w.abs().amax(1) / 7
        q = torch.clamp(torch.round(w / s[:, None]), -7, 7).to(torch.int8)
        assert torch.equal(dst.get(f"{base}.weight"), _pack_spec(q))
        word = dst.get(f"{base}.weight_scale")
        assert dst.info(f"{base}.weight_scale").dtype == torch.int64 and word.shape == (w.shape[0], 1)
        assert torch.equal(word >> 32, torch.zeros_like(word))  # high 32 bits zero
        bits = (word & 0xFFFFFFFF).to(torch.int32).view(torch.float32).squeeze(1)
        assert torch.equal(bits, s)
        bias = 8 * (s.bfloat16()[:, None] * q.bfloat16()).float().sum(1)  # bf16 product, fp32 sum
        assert torch.equal(dst.get(f"{base}.bias"), bias)
    assert dst.get("model.layers.1.mlp.experts.5.down_proj.alpha").item() == 1.0
    # safetensors dtype on disk is U64 for the scale
    from safetensors import safe_open

    shard = dst.folder / dst.shard_of("model.layers.1.mlp.experts.5.down_proj.weight_scale")
    with safe_open(shard, "pt") as f:
        assert f.get_slice("model.layers.1.mlp.experts.5.down_proj.weight_scale").get_dtype() == "U64"


def test_written_tensors_bit_exact_w4a8_two_level(float_ckpts, quantized):
    src, dst = CheckpointReader(float_ckpts["mixtral"]), CheckpointReader(quantized["mixtral", "w4a8"])
    for proj, chunks in (("w3", 1), ("w2", 16)):
        base = f"model.layers.0.block_sparse_moe.experts.2.{proj}"
        w = src.get(f"{base}.weight").float()
        N, K = w.shape
        s1 = w.abs().amax(1) / 127
        q8 = torch.clamp(torch.round(w / s1[:, None]), -127, 127)
        g = q8.reshape(N, K // 256, 256)
        s2 = g.abs().amax(-1) / 7
        q = torch.clamp(torch.round(g / s2[..., None]), -7, 7).reshape(N, K).to(torch.int8)
        assert torch.equal(dst.get(f"{base}.weight"), _pack_spec(q))
        assert torch.equal(dst.get(f"{base}.weight_scale"), s1[:, None])
        assert torch.equal(dst.get(f"{base}.weight_scale_second"), s2)
        assert (
            not dst.get(f"{base}.weight_offset").any() and not dst.get(f"{base}.weight_offset_second").any()
        )
        deq = q.float() * s2.bfloat16().float().repeat_interleave(256, 1) * s1.bfloat16().float()[:, None]
        sb = 8 * deq.reshape(N, chunks, K // chunks).sum(-1)
        assert torch.equal(dst.get(f"{base}.scale_bias"), sb)


def test_written_tensors_bit_exact_w8a8(float_ckpts, quantized):
    src, dst = (
        CheckpointReader(float_ckpts["deepseek_v3"]),
        CheckpointReader(quantized["deepseek_v3", "w8a8"]),
    )
    base = "model.layers.1.mlp.experts.7.up_proj"
    w = src.get(f"{base}.weight").float()
    s = w.abs().amax(1) / 127
    assert torch.equal(
        dst.get(f"{base}.weight"), torch.clamp(torch.round(w / s[:, None]), -127, 127).to(torch.int8)
    )
    assert torch.equal(dst.get(f"{base}.weight_scale"), s[:, None])


# ------------------------------------------------------------------------------- EP / TP loading


def _tokens(E=8, H=512):
    return _inputs(H, E, T=48)


def test_expert_parallel_sum_equals_single(quantized):
    out = quantized["qwen3_moe", "w4a8"]
    x, w, ids = _tokens()
    full = from_checkpoint(out, layer=1)(x, w, ids)
    parts = [from_checkpoint(out, layer=1, ep_rank=r, ep_size=2) for r in range(2)]
    assert parts[0].dims.E == 4 and parts[1].expert_offset == 4
    # Per-token activation quant is independent of the other rank's experts: only the combine
    # order differs (fp32 sums).
    torch.testing.assert_close(parts[0](x, w, ids) + parts[1](x, w, ids), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8_pc", "w4a8_g128"])
def test_tensor_parallel_sum_close_to_single(scheme, float_ckpts, tmp_path):
    out = quantize(float_ckpts["qwen3_moe"], tmp_path / scheme, scheme)
    x, w, ids = _tokens()
    full = from_checkpoint(out, layer=1)(x, w, ids)
    ranks = [from_checkpoint(out, layer=1, tp_rank=r, tp_size=2) for r in range(2)]
    assert ranks[0].dims.tp == 2
    y0, y1 = ranks[0](x, w, ids), ranks[1](x, w, ids)
    summed = y0 + y1
    # Each rank quantizes its own half of the SwiGLU output per token (finer int8 steps) and the
    # outputs are bf16-rounded twice: differences at the int8-activation / bf16 level only.
    m = compare(summed, full)
    assert m["rel_l2"] < 0.02 and m["cosine"] > 0.9998, m
    # ...and far from a wrong slicing: half the experts' rows swapped would be O(1) off.
    assert compare(y0, full)["rel_l2"] > 0.3


def test_tensor_parallel_refused_for_clip_bias(quantized):
    with pytest.raises(CheckpointError) as e:
        from_checkpoint(quantized["qwen3_moe", "clip"], layer=0, tp_rank=0, tp_size=2)
    msg = str(e.value)
    assert "down_proj.bias" in msg and "sums over all of K" in msg and "expert parallelism" in msg


def test_missing_alpha_is_an_error_or_recorded_ones(quantized, tmp_path):
    import shutil

    from safetensors.torch import save_file

    out = tmp_path / "noalpha"
    shutil.copytree(quantized["qwen3_moe", "clip"], out)
    r = CheckpointReader(out)
    ts = {k: r.get(k) for k in r.keys() if not k.endswith(".alpha")}
    ts = {k: (v.view(torch.uint64) if k.endswith("weight_scale") else v) for k, v in ts.items()}
    shard = r.shards[0]
    save_file(ts, str(out / shard))
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if not k.endswith(".alpha")}
    (out / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError) as e:
        from_checkpoint(out, layer=0)
    assert "missing model.layers.0.mlp.experts.0.down_proj.alpha" in str(e.value)
    assert "missing_alpha=ones" in str(e.value)
    with pytest.warns(UserWarning, match="missing_alpha=ones"):
        layer = from_checkpoint(out, layer=0, recipe_overrides=["scheme.missing_alpha=ones"])
    assert torch.equal(layer.w2_alpha, torch.ones(8))


def test_clip_checkpoint_runs_unclipped_as_ab_switch(quantized):
    out = quantized["qwen3_moe", "clip"]
    a = from_checkpoint(out, layer=0)
    b = from_checkpoint(out, layer=0, recipe_overrides=["scheme.activation_use_clip=false"])
    assert a.scheme.flags["activation_use_clip"] and not b.scheme.flags["activation_use_clip"]
    x, w, ids = _tokens()
    # alpha = 1 clip equals plain dynamic quant of the fp32 SwiGLU; the unclipped path rounds to
    # bf16 first (spec 1.4), so the two are close but not identical.
    assert compare(a(x, w, ids), b(x, w, ids))["rel_l2"] < 0.02


# ------------------------------------------------------------------------------------ CLI


def test_cli_check_and_eval(quantized, float_ckpts, tmp_path):
    r = cli("check", f"checkpoint={quantized['mixtral', 'clip']}")
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and "w4a8_clip" in r.stdout
    js = tmp_path / "ev.json"
    r = cli(
        "eval",
        f"checkpoint={quantized['mixtral', 'w8a8']}",
        f"reference={float_ckpts['mixtral']}",
        "tokens=64",
        f"out={js}",
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(js.read_text())["layers"]
    assert [row["layer"] for row in rows] == [0, 1]
    assert all(row["rel_l2"] < LIMITS["w8a8"] and row["scheme"] == "w8a8" for row in rows)
