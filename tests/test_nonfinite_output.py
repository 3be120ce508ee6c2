"""quantize never writes a non-finite value: biases of weights near the float max are computed
in fp64 where the bf16/fp32 formula overflows, and a value that does not fit fp32 is refused
naming the tensor. Float tensors copied as they are must be finite too."""

import shutil

import pytest
import torch
from checkpoint_helpers import quantize, reshard, tensors
from safetensors.torch import save_file

from quantfw.errors import CheckpointError
from quantfw.integrations.hf import save_tiny_checkpoint
from quantfw.io.reader import CheckpointReader
from quantfw.ops import decode_scale_u64
from quantfw.quantize import primitives as P

BF16_MAX = torch.finfo(torch.bfloat16).max
KEY = "model.layers.1.mlp.experts.2.down_proj.weight"  # [H=128, I=64]
GATE = "model.layers.1.mlp.experts.2.gate_proj.weight"  # [I=64, H=128]: one bias chunk per row


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    one = save_tiny_checkpoint(
        "qwen3_moe", root / "one", hidden_size=128, moe_intermediate_size=64, num_experts=4, vocab_size=64
    )
    return reshard(one, root / "in", 2)


def _with(src, tmp_path, key, value):
    bad = tmp_path / "in"
    shutil.copytree(src, bad)
    r = CheckpointReader(bad)
    shard = r.shard_of(key)
    ts = {k: r.get(k) for k in r.keys_in(shard)}
    ts[key] = value
    save_file(ts, str(bad / shard), metadata={"format": "pt"})
    return bad


def _assert_all_finite(out):
    for k, t in tensors(out).items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), k
        elif k.endswith("weight_scale") and t.dtype == torch.int64:  # u64-encoded fp32 scales
            assert torch.isfinite(decode_scale_u64(t)).all(), k


def _weight(*rows, shape=(128, 64)):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for i, row in enumerate(rows):
        w[i] = row
    return w


def test_a8w4_bias_of_a_weight_at_bf16_max_is_refused_naming_the_tensor(src, tmp_path):
    w = _weight()
    w[5, 9] = BF16_MAX  # bias = 8 * 7 * (max / 7) > fp32 max
    bad = _with(src, tmp_path, KEY, w)
    with pytest.raises(CheckpointError) as e:
        quantize(bad, tmp_path / "out", "clip")
    msg = str(e.value)
    assert "\n" not in msg and "model.layers.1.mlp.experts.2.down_proj" in msg and "bias" in msg
    assert "non-finite" in msg
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize("scheme", ["clip", "w4a8_pc"])
def test_cancelling_extremes_give_a_finite_exact_bias(src, tmp_path, scheme):
    """+max and -max in one row: the bf16 products overflow (inf - inf), the true sum is 0."""
    half = torch.full((64,), BF16_MAX, dtype=torch.bfloat16)
    w = _weight(torch.cat([half, -half]), shape=(64, 128))
    out = quantize(_with(src, tmp_path, GATE, w), tmp_path / "out", scheme)
    _assert_all_finite(out)
    t = tensors(out)
    prefix = GATE[: -len(".weight")]
    bias = t[prefix + ".bias"] if scheme == "clip" else t[prefix + ".scale_bias"]
    assert torch.equal(bias[0], torch.zeros_like(bias[0]))
    assert torch.isfinite(bias).all() and bias[1:].abs().max() > 0


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8_pc"])
def test_weight_at_bf16_max_is_written_finite_or_refused(src, tmp_path, scheme):
    w = _weight()
    w[3, 0] = BF16_MAX
    w[4, 1] = -BF16_MAX
    bad = _with(src, tmp_path, KEY, w)
    try:
        out = quantize(bad, tmp_path / "out", scheme)
    except CheckpointError as e:
        assert "model.layers.1.mlp.experts.2.down_proj" in str(e) and "non-finite" in str(e)
        return
    _assert_all_finite(out)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_copied_float_tensor_must_be_finite(src, tmp_path, value):
    key = "model.layers.0.input_layernorm.weight"
    norm = torch.ones(128)
    norm[7] = value
    bad = _with(src, tmp_path, key, norm)
    with pytest.raises(CheckpointError, match=f"tensor '{key}' contains NaN or Inf"):
        quantize(bad, tmp_path / "out", "w8a8")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_primitives_recompute_overflowed_rows_in_fp64():
    q = torch.zeros(3, 128, dtype=torch.int8)
    q[0, :64], q[0, 64:] = 7, -7  # cancels
    q[1, 0] = 7  # 8 * 7 * s exceeds fp32
    q[2, :4] = torch.tensor([1, -2, 3, 4], dtype=torch.int8)  # ordinary row
    s = torch.tensor([BF16_MAX / 7, BF16_MAX / 7, 0.01])
    b = P.a8w4_bias(q, s)
    assert b[0] == 0 and b[1] == float("inf")
    ordinary = 8 * (torch.tensor(0.01).to(torch.bfloat16) * q[2].to(torch.bfloat16)).float().sum()
    assert b[2] == ordinary  # rows that did not overflow keep the bf16 formula bit for bit
    sb = P.scale_bias_msmodelslim(q, s, chunks=2)
    assert not torch.isfinite(sb[0]).any()  # each half alone exceeds fp32: left inf for the guard
    total = P.scale_bias_msmodelslim(q, s, chunks=1)
    assert total[0, 0] == 0 and total[1, 0] == float("inf")
    assert total[2, 0] == 8 * (q[2].float() * float(s[2].to(torch.bfloat16))).sum()
