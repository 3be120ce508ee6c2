"""FP8 releases in: block dequantization vs an independent formula, the release writer, and
`quantize` of tiny DeepSeek-V3 / Qwen3-MoE FP8 checkpoints vs the same float weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_helpers import cli, quantize
from safetensors.torch import load_file, save_file

from quantfw import from_checkpoint
from quantfw.errors import CheckpointError, ConfigError
from quantfw.eval.metrics import compare
from quantfw.eval.synthetic import hidden_states, random_routing
from quantfw.io import fp8
from quantfw.io.experts import MoEModel, read_float_experts
from quantfw.io.fp8_release import write_fp8_release
from quantfw.io.loader import check, open_checkpoint
from quantfw.io.reader import CheckpointReader
from quantfw.moe.reference import FloatMoE

pytest.importorskip("transformers")
from quantfw.integrations.hf import save_tiny_checkpoint  # noqa: E402

BLOCK = (32, 16)  # tiny models: many blocks; DeepSeek kv_a_proj_with_mqa (48 rows) has partial ones
TARGETS = [r"self_attn", r"shared_experts", r"eh_proj"]
MTP = 2  # DeepSeek tiny: num_hidden_layers = 2 -> the MTP layer has index 2


# ------------------------------------------------------------------ independent fp8 e4m3fn decode


def _e4m3(code: int) -> float:
    """float8_e4m3fn byte -> value: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no inf."""
    sign = -1.0 if code & 0x80 else 1.0
    e, m = (code >> 3) & 0xF, code & 0x7
    if e == 0:
        return sign * (m / 8) * 2.0**-6
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


POSITIVE = [(_e4m3(c), c) for c in range(0x7F)]  # 0x7F is NaN


def _nearest_e4m3(x: float) -> float:
    """Round to nearest float8_e4m3fn, ties to even mantissa, saturating at 448."""
    a = min(abs(x), 448.0)
    best = min(POSITIVE, key=lambda vc: (abs(vc[0] - a), vc[1] & 1))
    return math.copysign(best[0], x)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _same_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    raw = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(raw(x), raw(y))


# ------------------------------------------------------------------ dequantize / quantize_block


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_per_element_formula(scale_dtype):
    g = torch.Generator().manual_seed(0)
    n, k = 37, 50  # 3 x 4 blocks of 16, the last row and column partial
    block = (16, 16)
    codes = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN
    w = codes.view(torch.float8_e4m3fn)
    scale = (torch.rand(3, 4, generator=g) * 1e-2 + 1e-4).to(scale_dtype)
    got = fp8.dequantize(w, scale, block)
    s32 = scale.float().numpy()
    want = np.empty((n, k), np.float32)
    for i in range(n):
        for j in range(k):
            want[i, j] = np.float32(_e4m3(int(codes[i, j]))) * s32[i // 16, j // 16]
    assert got.dtype == torch.float32
    assert torch.equal(_bits(got), _bits(torch.from_numpy(want)))
    # fused experts [E, N, K] with [E, nb, kb] scales: each expert on its own grid
    w3, s3 = torch.stack([w, w.flip(0)]), torch.stack([scale, scale * 2])
    got3 = fp8.dequantize(w3, s3, block)
    assert torch.equal(_bits(got3[0]), _bits(got))
    assert torch.equal(_bits(got3[1]), _bits(fp8.dequantize(w.flip(0), scale * 2, block)))


def test_quantize_block_formula():
    g = torch.Generator().manual_seed(1)
    n, k = 37, 50
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 1, k)
    w[:16, 16:32] = 0  # an all-zero block gets scale 1
    q, s = fp8.quantize_block(w, (16, 16))
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (3, 4)
    wn = w.numpy()
    for bi in range(3):
        for bj in range(4):
            block = wn[bi * 16 : (bi + 1) * 16, bj * 16 : (bj + 1) * 16]
            amax = np.float32(np.abs(block).max())
            want = np.float32(1.0) if amax == 0 else np.float32(amax / np.float32(448.0))
            assert s[bi, bj].item() == want, (bi, bj)
    for i in range(0, n, 3):
        for j in range(k):
            x = np.float32(wn[i, j]) / np.float32(s[i // 16, j // 16].item())
            assert q[i, j].float().item() == _nearest_e4m3(float(x)), (i, j)
    # round trip within half an fp8 step (3 mantissa bits) of each block's scale
    err = (fp8.dequantize(q, s, (16, 16)) - w).abs()
    assert err.max() <= (s.repeat_interleave(16, 0)[:n].repeat_interleave(16, 1)[:, :k] * 16).max()


# ------------------------------------------------------------------ checkpoints


def _rewrite(src: Path, dst: Path, edit=None, config_edit=None, shards=None) -> Path:
    """Copy a single-shard checkpoint, editing its tensors / config; `shards` splits keys into
    named shards by a predicate key -> shard name (with an index)."""
    t = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    if edit:
        edit(t)
    if config_edit:
        config_edit(cfg)
    dst.mkdir(parents=True)
    if shards is None:
        save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    else:
        by: dict[str, dict] = {}
        for k, v in t.items():
            by.setdefault(shards(k), {})[k] = v
        for name, part in by.items():
            save_file(part, str(dst / name), metadata={"format": "pt"})
        wm = {k: shards(k) for k in t}
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _add_mtp(t: dict) -> None:
    """A DeepSeek MTP module at layer MTP: a copy of MoE layer 1 plus eh_proj, enorm, hnorm,
    shared_head and its own embed_tokens (the release's key names)."""
    g = torch.Generator().manual_seed(7)
    for k in [k for k in t if k.startswith("model.layers.1.")]:
        t[k.replace("layers.1.", f"layers.{MTP}.")] = t[k] * 1.5
    H = t["model.norm.weight"].shape[0]
    p = f"model.layers.{MTP}."
    t[p + "eh_proj.weight"] = torch.randn(H, 2 * H, generator=g) * 0.02
    t[p + "enorm.weight"] = torch.ones(H)
    t[p + "hnorm.weight"] = torch.ones(H)
    t[p + "shared_head.norm.weight"] = torch.ones(H)
    t[p + "shared_head.head.weight"] = t["lm_head.weight"].clone()
    t[p + "embed_tokens.weight"] = t["model.embed_tokens.weight"].clone()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """arch -> (FP8 release, float fp32 checkpoint of the dequantized FP8 weights)."""
    root = tmp_path_factory.mktemp("fp8")
    out = {}
    for arch in ("deepseek_v3", "qwen3_moe"):
        plain = save_tiny_checkpoint(arch, root / f"{arch}-plain")
        if arch == "deepseek_v3":
            plain = _rewrite(
                plain,
                root / f"{arch}-bf",
                edit=_add_mtp,
                config_edit=lambda c: c.update(num_nextn_predict_layers=1),
            )
        f8 = write_fp8_release(plain, root / f"{arch}-fp8", BLOCK)
        r = CheckpointReader(f8)
        deq = {k: fp8.read_float(r, k).contiguous() for k in r.keys() if not fp8.is_scale_key(k)}
        flt = root / f"{arch}-float"
        flt.mkdir()
        save_file(deq, str(flt / "model.safetensors"), metadata={"format": "pt"})
        cfg = {k: v for k, v in r.config().items() if k != "quantization_config"}
        (flt / "config.json").write_text(json.dumps(cfg))
        out[arch] = (f8, flt)
    return out


def test_release_writer_layout(ckpts):
    f8, _ = ckpts["deepseek_v3"]
    r = CheckpointReader(f8)
    assert r.config()["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
    }
    fp8_keys = {k for k in r.keys() if r.info(k).dtype == torch.float8_e4m3fn}
    for k in fp8_keys:
        s = r.info(fp8.scale_key(k))
        assert s.dtype == torch.float32 and s.shape == fp8.scale_shape(r.info(k).shape, BLOCK)
    for name in ("self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "mlp.shared_experts.down_proj"):
        assert f"model.layers.1.{name}.weight" in fp8_keys
    assert "model.layers.0.mlp.gate_proj.weight" in fp8_keys  # dense MLP
    assert f"model.layers.{MTP}.eh_proj.weight" in fp8_keys
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in fp8_keys
    kept = [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.1.input_layernorm.weight",
        f"model.layers.{MTP}.shared_head.head.weight",
    ]
    assert not fp8_keys & set(kept) and all(k in r for k in kept)
    # kv_a_proj_with_mqa is 48 x 512: one full and one half row block of 32
    assert r.info("model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv").shape == (2, 32)


def test_release_reads_back_with_transformers(ckpts):
    """transformers' own FP8 loader (it dequantizes on CPU) reads the layout we write."""
    import transformers as tf

    f8, flt = ckpts["qwen3_moe"]
    model = tf.AutoModelForCausalLM.from_pretrained(f8, dtype=torch.float32)
    ref = tf.AutoModelForCausalLM.from_pretrained(flt, dtype=torch.float32)
    ours = CheckpointReader(flt)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w, ours.get("model.layers.0.self_attn.q_proj.weight"))
    x = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
@pytest.mark.parametrize("scheme", ["w4a8", "clip"])
def test_fp8_quantize_equals_quantize_of_dequantized_float(arch, scheme, ckpts, tmp_path):
    f8, flt = ckpts[arch]
    a = quantize(f8, tmp_path / "a", scheme, targets=TARGETS)
    b = quantize(flt, tmp_path / "b", scheme, targets=TARGETS)
    ra, rb, src = CheckpointReader(a), CheckpointReader(b), CheckpointReader(f8)
    assert set(ra.keys()) == set(rb.keys())
    fp8_keys = {k for k in src.keys() if src.info(k).dtype == torch.float8_e4m3fn}
    quantized = 0
    for k in ra.keys():
        x, y = ra.get(k), rb.get(k)
        assert x.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) and not fp8.is_scale_key(k), k
        if k in fp8_keys and x.dtype == torch.bfloat16:  # an FP8 linear written float
            assert y.dtype == torch.float32 and torch.equal(x, y.to(torch.bfloat16)), k
            continue
        assert _same_bytes(x, y), k
        quantized += x.dtype in (torch.int8, torch.int32)
    assert quantized > 0
    # non-expert FP8 linears: W8A8 where targeted, bf16 otherwise
    L = 1 if arch == "deepseek_v3" else 0
    attn = f"model.layers.{L}.self_attn.{'q_b_proj' if arch == 'deepseek_v3' else 'q_proj'}"
    assert ra.info(attn + ".weight").dtype == torch.int8 and attn + ".weight_scale" in ra
    if arch == "deepseek_v3":
        assert ra.info("model.layers.1.mlp.shared_experts.up_proj.weight").dtype == torch.int8
        dense = "model.layers.0.mlp.down_proj.weight"
        assert ra.info(dense).dtype == torch.bfloat16
        assert torch.equal(ra.get(dense), fp8.read_float(src, dense).to(torch.bfloat16))
        assert (
            ra.info("model.layers.1.mlp.gate.weight").dtype
            == src.info("model.layers.1.mlp.gate.weight").dtype
        )
    # metadata: the fp8 quantization_config is replaced, never merged
    cfg = json.loads((a / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if scheme == "clip":
        assert qc["quant_method"] == "compressed-tensors" and "group_0" in qc["config_groups"]
        assert not {"fmt", "weight_block_size", "activation_scheme"} & qc.keys()
    else:
        assert qc is None
        desc = json.loads((a / "quant_model_description.json").read_text())
        assert desc[attn + ".weight"] == "W8A8_DYNAMIC"
        assert "fp8" not in json.dumps(desc)
    # the result checks and loads; the loaded layer matches the dequantized float experts
    assert check(open_checkpoint(a)) == []
    layer = from_checkpoint(a, layer=L)
    w13, w2 = _float_experts(flt, L)
    x = hidden_states(64, w13.shape[2], seed=0)
    w, ids = random_routing(64, w13.shape[0], 2)
    m = compare(layer(x, w, ids), FloatMoE(w13, w2)(x, w, ids))
    assert m["rel_l2"] < 0.3 and m["cosine"] > 0.95, m


def _float_experts(folder, layer):
    r = CheckpointReader(folder)
    return read_float_experts(r, MoEModel.from_config(r.config(), "config.json"), layer)


def test_stale_quantization_config_of_float_input_never_reaches_output(ckpts, tmp_path):
    _, flt = ckpts["qwen3_moe"]
    stale = _rewrite(
        flt,
        tmp_path / "stale",
        config_edit=lambda c: c.update(quantization_config={"quant_method": "fp8", "fmt": "e4m3"}),
    )
    out = quantize(stale, tmp_path / "q", "w4a8")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


# ------------------------------------------------------------------ MTP


def test_mtp_quantized_like_other_layers(ckpts, tmp_path):
    f8, _ = ckpts["deepseek_v3"]
    out = quantize(f8, tmp_path / "q", "w4a8", targets=TARGETS)
    op = open_checkpoint(out)
    assert list(op.prefixes) == [1, MTP]
    r = CheckpointReader(out)
    p = f"model.layers.{MTP}."
    assert r.info(p + "mlp.experts.0.gate_proj.weight").dtype == torch.int8
    assert r.info(p + "eh_proj.weight").dtype == torch.int8  # targeted
    assert r.info(p + "shared_head.head.weight").dtype == torch.float32  # kept float in the release
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_mtp_drop_via_cli(ckpts, tmp_path):
    f8, _ = ckpts["deepseek_v3"]
    out = tmp_path / "q"
    args = [
        "quantize",
        f"input={f8}",
        f"output={out}",
        "scheme=w8a8",
        "format=msmodelslim",
        "quantize.mtp=drop",
    ]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    keys = CheckpointReader(out).keys()
    assert keys and not any(k.startswith(f"model.layers.{MTP}.") for k in keys)
    assert any(k.startswith("model.layers.1.mlp.experts.") for k in keys)
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0
    r = cli("check", f"checkpoint={out}")
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    r = cli(*args[:2], f"output={tmp_path / 'x'}", "quantize.mtp=float")
    assert r.returncode == 2 and "quantize.mtp='float'" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------ layouts


def test_scales_in_another_shard(ckpts, tmp_path):
    f8, _ = ckpts["qwen3_moe"]
    split = _rewrite(
        f8,
        tmp_path / "split",
        shards=lambda k: (
            "model-00002-of-00002.safetensors" if fp8.is_scale_key(k) else "model-00001-of-00002.safetensors"
        ),
    )
    a = quantize(split, tmp_path / "a", "w8a8")
    b = quantize(f8, tmp_path / "b", "w8a8")
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert set(ra.keys()) == set(rb.keys())
    assert all(_same_bytes(ra.get(k), rb.get(k)) for k in rb.keys())


def test_fused_fp8_experts(ckpts, tmp_path):
    """transformers-5 fused experts stored FP8: `experts.gate_up_proj` [E, 2I, H] with
    `experts.gate_up_proj_scale_inv` [E, 2I/bn, H/bk] (I a multiple of the block, so gate and up
    blocks are those of the per-expert layout): same output as the per-expert release."""
    f8, _ = ckpts["qwen3_moe"]
    r = CheckpointReader(f8)
    E = MoEModel.from_config(r.config(), "config.json").num_experts

    def fuse(t):
        for L in (0, 1):
            p = f"model.layers.{L}.mlp.experts"
            for name, projs in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
                for suffix, key in (("weight", name), ("weight_scale_inv", name + "_scale_inv")):
                    per = [torch.cat([t.pop(f"{p}.{e}.{q}.{suffix}") for q in projs]) for e in range(E)]
                    t[f"{p}.{key}"] = torch.stack(per)

    fused = _rewrite(f8, tmp_path / "fused", edit=fuse)
    assert (
        CheckpointReader(fused).info("model.layers.0.mlp.experts.gate_up_proj").dtype == torch.float8_e4m3fn
    )
    a = quantize(fused, tmp_path / "a", "w4a8_pc")
    b = quantize(f8, tmp_path / "b", "w4a8_pc")
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert set(ra.keys()) == set(rb.keys())
    assert all(_same_bytes(ra.get(k), rb.get(k)) for k in rb.keys())


# ------------------------------------------------------------------ one-line errors

W = "model.layers.0.self_attn.o_proj.weight"


def _bad(ckpts, tmp_path, edit=None, config_edit=None):
    f8, _ = ckpts["qwen3_moe"]
    return _rewrite(f8, tmp_path / "bad", edit=edit, config_edit=config_edit)


def _error(src, tmp_path) -> str:
    with pytest.raises(CheckpointError) as e:
        quantize(src, tmp_path / "q", "w8a8")
    msg = str(e.value)
    assert "\n" not in msg and str(src) in msg
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())
    return msg


def test_error_missing_scale_inv(ckpts, tmp_path):
    msg = _error(_bad(ckpts, tmp_path, edit=lambda t: t.pop(fp8.scale_key(W))), tmp_path)
    assert f"'{W}'" in msg and "weight_scale_inv" in msg


def test_error_scale_shape(ckpts, tmp_path):
    def edit(t):
        t[fp8.scale_key(W)] = torch.ones(3, 5)

    msg = _error(_bad(ckpts, tmp_path, edit=edit), tmp_path)
    n, k = CheckpointReader(ckpts["qwen3_moe"][0]).info(W).shape
    assert f"'{W}'" in msg and "[3, 5]" in msg and f"[{math.ceil(n / 32)}, {math.ceil(k / 16)}]" in msg


def test_error_config_block_differs_from_scales(ckpts, tmp_path):
    def config_edit(c):
        c["quantization_config"]["weight_block_size"] = [64, 64]

    msg = _error(_bad(ckpts, tmp_path, config_edit=config_edit), tmp_path)
    assert "implies 32x16 blocks" in msg and "[64, 64]" in msg


def test_error_scale_without_fp8_weight(ckpts, tmp_path):
    def edit(t):
        t[W] = t[W].float()  # a float weight with a stale scale_inv

    msg = _error(_bad(ckpts, tmp_path, edit=edit), tmp_path)
    assert f"'{fp8.scale_key(W)}'" in msg and "stale" in msg


def test_error_e5m2_and_config_fmt(ckpts, tmp_path):
    def edit(t):
        t[W] = t[W].float().to(torch.float8_e5m2)

    msg = _error(_bad(ckpts, tmp_path, edit=edit), tmp_path)
    assert f"'{W}'" in msg and "F8_E5M2" in msg
    msg = _error(
        _rewrite(
            ckpts["qwen3_moe"][0],
            tmp_path / "e5",
            config_edit=lambda c: c["quantization_config"].update(fmt="e5m2"),
        ),
        tmp_path,
    )
    assert "fmt='e5m2'" in msg


def test_cli_error_is_one_line(ckpts, tmp_path):
    bad = _bad(ckpts, tmp_path, edit=lambda t: t.pop(fp8.scale_key(W)))
    r = cli("quantize", f"input={bad}", f"output={tmp_path / 'q'}", "scheme=w8a8", "format=msmodelslim")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"'{W}'" in r.stderr.strip().splitlines()[-1]


def test_invalid_mtp_mode(ckpts, tmp_path):
    from quantfw.quantize.routing import TensorRouter

    with pytest.raises(ConfigError, match="quantize.mtp"):
        TensorRouter(CheckpointReader(ckpts["qwen3_moe"][0]), None, [], [], mtp="float")
