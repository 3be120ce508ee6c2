"""quantize.compute_dtype=bfloat16 reproduces the reference converter's rounding chain (spec
section 12) for routed experts and W8A8 linears, bit for bit, against an independent per-element
formula written here (Python floats, explicit fp32 / bf16 rounding), from FP8 and from BF16 input."""

from __future__ import annotations

import re
import struct

import pytest
import torch

from quantfw.api import components
from quantfw.config.compose import compose
from quantfw.engines import load_profile
from quantfw.errors import ConfigError
from quantfw.io.fp8_release import write_fp8_release
from quantfw.io.reader import CheckpointReader
from quantfw.quantize.checkpoint import quantize_checkpoint

pytest.importorskip("transformers")
from engine_helpers import BLOCK, deepseek_float  # noqa: E402


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def bf16(x: float) -> float:
    """Round to the nearest bfloat16 (ties to even), through fp32 as torch's bf16 ops do."""
    b = struct.unpack("<I", struct.pack("<f", f32(x)))[0]
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]


def ref_row(w: list[float], qmax: int) -> tuple[list[int], float, float]:
    """The converter's chain on one output channel of bf16 values: (q, s, bias)."""
    s = bf16(bf16(max(abs(v) for v in w)) / qmax)
    q = [int(min(qmax, max(-qmax, round(bf16(v / s))))) for v in w]  # round(): half to even
    bias = bf16(f32(sum(8 * bf16(s * qi) for qi in q)))
    return q, s, bias


def source_rows(reader: CheckpointReader, key: str, rows: range) -> list[list[float]]:
    """bf16 input rows as the converter sees them: FP8 * scale_inv in fp32, then bf16."""
    t = reader.get(key)
    if t.dtype != torch.float8_e4m3fn:
        return [[float(v) for v in t[r].float()] for r in rows]
    inv = reader.get(key + "_scale_inv").double()
    vals = t.float().double()
    return [
        [bf16(f32(float(vals[r, k]) * float(inv[r // BLOCK[0], k // BLOCK[1]]))) for k in range(t.shape[1])]
        for r in rows
    ]


def unpack_row_pair(packed: torch.Tensor, j: int) -> tuple[list[int], list[int]]:
    lo = [((int(b) & 0xF) ^ 8) - 8 for b in packed[j]]
    hi = [int(b) >> 4 for b in packed[j]]  # int8 arithmetic shift
    return lo, hi


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    flt = deepseek_float(root)
    return {
        "fp8": write_fp8_release(flt, root / "fp8", BLOCK),
        "bf16": deepseek_float(root / "b", torch.bfloat16),
    }


def _quantize(src, dst, compute_dtype):
    scheme, fmt, _ = components(compose("default", ["scheme=w4a8_clip", "format=compressed_tensors"]))
    q = load_profile("cann_recipes").quantize
    return quantize_checkpoint(
        src, dst, scheme, fmt, progress=False, targets=list(q.targets), ignore=list(q.ignore), compute_dtype=compute_dtype
    )


ROWS = range(4)
EXPERTS = ["model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.mlp.experts.5.down_proj", "model.layers.2.mlp.experts.3.up_proj"]
LINEARS = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.shared_experts.up_proj", "model.layers.1.self_attn.o_proj", "model.layers.0.self_attn.q_b_proj"]


@pytest.mark.parametrize("kind", ["fp8", "bf16"])
def test_bf16_mode_is_the_reference_chain_bit_for_bit(inputs, kind, tmp_path):
    src = CheckpointReader(inputs[kind])
    out = CheckpointReader(_quantize(inputs[kind], tmp_path / "q", "bfloat16"))
    for m in EXPERTS:
        rows = source_rows(src, m + ".weight", ROWS)
        packed, scale, bias = out.get(m + ".weight"), out.get(m + ".weight_scale"), out.get(m + ".bias")
        for r, w in zip(ROWS, rows):
            q, s, b = ref_row(w, 7)
            lo, hi = unpack_row_pair(packed, r // 2)
            assert (lo if r % 2 == 0 else hi) == q, (m, r)
            word = int(scale[r, 0]) & 0xFFFFFFFFFFFFFFFF
            assert word >> 32 == 0 and struct.unpack("<f", struct.pack("<I", word))[0] == s, (m, r)
            assert float(bias[r]) == b, (m, r, float(bias[r]), b)
    for m in LINEARS:
        rows = source_rows(src, m + ".weight", ROWS)
        weight, scale = out.get(m + ".weight"), out.get(m + ".weight_scale")
        assert weight.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape[1] == 1
        for r, w in zip(ROWS, rows):
            q, s, _ = ref_row(w, 127)
            assert [int(v) for v in weight[r]] == q, (m, r)
            assert float(scale[r, 0]) == s, (m, r)


def test_default_fp32_mode_is_not_the_bf16_chain(inputs, tmp_path):
    a = CheckpointReader(_quantize(inputs["fp8"], tmp_path / "fp32", "float32"))
    b = CheckpointReader(_quantize(inputs["fp8"], tmp_path / "bf16", "bfloat16"))
    m = EXPERTS[0]
    assert not torch.equal(a.get(m + ".bias"), b.get(m + ".bias"))
    s32 = a.get(m + ".weight_scale").view(torch.int64) & 0xFFFFFFFF
    assert not torch.equal(s32, b.get(m + ".weight_scale").view(torch.int64) & 0xFFFFFFFF)
    prov = b.config()["quantization_config"]["quantfw"]
    assert prov["compute_dtype"] == "bfloat16" and "compute_dtype" not in a.config()["quantization_config"]["quantfw"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["scheme=w4a8", "format=msmodelslim"], "min-max per-channel chain only (found weight_observer=minmax, group_size=256)"),
        (["scheme=w4a8_clip", "format=compressed_tensors", "scheme.weight_observer=mse"], "found weight_observer=mse"),
    ],
)
def test_bf16_mode_refuses_what_the_converter_never_does(inputs, tmp_path, overrides, message):
    scheme, fmt, _ = components(compose("default", overrides))
    with pytest.raises(ConfigError, match=re.escape(message)):
        quantize_checkpoint(inputs["bf16"], tmp_path / "x", scheme, fmt, progress=False, compute_dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"quantize.compute_dtype='float16' \(allowed: float32, bfloat16\)"):
        quantize_checkpoint(inputs["bf16"], tmp_path / "y", scheme, fmt, progress=False, compute_dtype="float16")
