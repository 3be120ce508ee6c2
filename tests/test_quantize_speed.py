"""The throughput changes keep results exact: row-blocked primitives equal the whole-tensor formulas
bit for bit, NaN/Inf are still caught (from the amax, without a separate pass), and the quantize
thread count does not change a single output byte."""

from __future__ import annotations

import pytest
import torch
from checkpoint_helpers import files_bytes, quantize, reshard

from quantfw.errors import CheckpointError, ConfigError
from quantfw.integrations.hf import save_tiny_checkpoint
from quantfw.quantize import primitives as P
from quantfw.quantize.weights import quantize_weight


def _w(shape, dtype=torch.float32, seed=0):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    w.reshape(-1, shape[-1])[0] = 0  # a zero channel: scale 1
    return w.to(dtype)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, so every test shape spans many blocks and a ragged last block."""
    monkeypatch.setattr(P, "_BLOCK_ELEMS", 700)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 10, 256), (7, 512)])
def test_blocked_primitives_equal_whole_tensor_formulas(small_blocks, dtype, shape):
    w = _w(shape, dtype)
    for bits in (4, 8):
        for cd in (torch.float32, torch.bfloat16):
            ratio = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(1)) * 0.5 + 0.5
            q, s = P.quantize_per_channel(w, bits, ratio, cd)
            qmax = 7 if bits == 4 else 127
            wc = w.to(cd)
            ref_s = wc.abs().amax(-1) * ratio.to(cd) / qmax
            ref_s = torch.where(ref_s == 0, torch.ones_like(ref_s), ref_s)
            ref_q = torch.clamp(torch.round(wc / ref_s.unsqueeze(-1)), -qmax, qmax).to(torch.int8)
            assert torch.equal(q, ref_q) and torch.equal(s, ref_s.float())
    q, s1, s2 = P.quantize_two_level(w, 64)
    wf = w.float()
    r1 = wf.abs().amax(-1) / 127
    r1 = torch.where(r1 == 0, torch.ones_like(r1), r1)
    q8 = torch.clamp(torch.round(wf / r1.unsqueeze(-1)), -127, 127).reshape(*shape[:-1], -1, 64)
    r2 = q8.abs().amax(-1) / 7
    r2 = torch.where(r2 == 0, torch.ones_like(r2), r2)
    rq = torch.clamp(torch.round(q8 / r2.unsqueeze(-1)), -7, 7).reshape(shape).to(torch.int8)
    assert torch.equal(q, rq) and torch.equal(s1, r1) and torch.equal(s2, r2)
    bias = P.a8w4_bias(q, s1)
    ref_bias = 8 * (s1.bfloat16().unsqueeze(-1) * q.bfloat16()).float().sum(-1)
    assert torch.equal(bias, ref_bias)
    sb = P.scale_bias_msmodelslim(q, s1, s2, chunks=4)
    deq = (
        q.float()
        * torch.repeat_interleave(s2.bfloat16().float(), 64, -1)
        * s1.bfloat16().float().unsqueeze(-1)
    )
    assert torch.equal(sb, 8 * deq.reshape(*shape[:-1], 4, -1).sum(-1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    "flags", [{"weight_bits": 8}, {"weight_bits": 4, "group_size": 64}, {"weight_bits": 4}]
)
@pytest.mark.parametrize("where", [(0, 0, 0), (1, 9, 255), (2, 4, 100)])
def test_non_finite_weight_caught_from_amax(small_blocks, bad, flags, where):
    w = _w((3, 10, 256), torch.bfloat16)
    w[where] = bad
    with pytest.raises(ConfigError, match="NaN or Inf"):
        quantize_weight(w, flags)


def test_thread_count_does_not_change_output(tmp_path):
    src = reshard(save_tiny_checkpoint("qwen3_moe", tmp_path / "one"), tmp_path / "three", 3)
    one = quantize(src, tmp_path / "w1", "w4a8", workers=1)
    three = quantize(src, tmp_path / "w3", "w4a8", workers=3)
    assert files_bytes(one) == files_bytes(three)


def test_nan_in_fused_expert_tensor_names_tensor_and_expert(tmp_path):
    import json

    from safetensors.torch import save_file

    src = tmp_path / "fused"
    src.mkdir()
    H, I, E = 512, 256, 4
    gate_up = torch.randn(E, 2 * I, H) * 0.02
    gate_up[2, I + 5, 7] = float("nan")
    key = "model.layers.0.mlp.experts.gate_up_proj"
    save_file(
        {key: gate_up, "model.layers.0.mlp.experts.down_proj": torch.randn(E, H, I) * 0.02},
        str(src / "model.safetensors"),
    )
    cfg = {"model_type": "qwen3_moe", "hidden_size": H, "moe_intermediate_size": I, "num_experts": E}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"gate_up_proj' \(expert 2\): contains NaN or Inf"):
        quantize(src, tmp_path / "out", "w8a8", workers=2)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_passthrough_finite_check_finds_every_position(dtype, bad):
    from quantfw.quantize.checkpoint import _all_finite

    t = _w((33, 1027), dtype)
    assert _all_finite(t) and _all_finite(t[:0])
    for pos in (0, 17, t.numel() - 1):
        u = t.clone()
        u.view(-1)[pos] = bad
        assert not _all_finite(u)
