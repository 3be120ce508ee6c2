"""Tests of the CPU reference ops against independent numpy / int64 formulas (spec 1.1-1.6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantfw.errors import LayoutError
from quantfw.ops import (
    decode_scale_u64,
    dequant_swiglu_quant,
    dynamic_quant,
    encode_scale_u64,
    grouped_matmul_a8w4,
    grouped_matmul_a8w8,
    int4_weight_to_int32,
    pack_int4,
    swiglu,
    swiglu_clip_quant,
    unpack_int4,
    unpack_int4_int32,
)

F32 = np.float32
PROP = settings(derandomize=True, max_examples=50, deadline=None)


# ---------------------------------------------------------------- independent reference formulas
def np_silu(a: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return a / (F32(1) + np.exp(-a))


def np_swiglu(x: np.ndarray, activate_left: bool = True) -> np.ndarray:
    i = x.shape[-1] // 2
    gate, up = (x[..., :i], x[..., i:]) if activate_left else (x[..., i:], x[..., :i])
    return np_silu(gate) * up


def np_quant_rows(y: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spec 1.1 / 1.4 step 4 in float32: s = t/127 (0 -> 1), q = clamp(rint(y / s), -128, 127)."""
    s = (t / F32(127)).astype(F32)
    s[s == 0] = 1
    q = np.clip(np.rint(y / s[..., None]), -128, 127).astype(np.int8)
    return q, s


def np_dynamic_quant(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np_quant_rows(x, np.abs(x).max(axis=-1))


def np_expert_rows(counts) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def peer_ok(actual: np.ndarray, golden: np.ndarray) -> tuple[bool, float, float]:
    """Spec 1.4 criterion: rel diff > 0.01 on <= 5 % of elements, none >= 0.1; |diff| < 0.01 counts 0."""
    a = np.asarray(actual, dtype=np.float64).ravel()
    b = np.asarray(golden, dtype=np.float64).ravel()
    d = np.abs(a - b)
    d[d < 0.01] = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(d == 0, 0.0, d / np.abs(b))
    frac = float((rel > 0.01).mean()) if rel.size else 0.0
    worst = float(rel.max()) if rel.size else 0.0
    return frac <= 0.05 and worst < 0.1, frac, worst


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- dynamic_quant
def test_dynamic_quant_matches_formula_with_zero_rows():
    # large enough that dividing vs multiplying by the reciprocal 127/amax differs somewhere
    x = torch.randn(400, 1000, generator=_gen(1)) * 3
    x[2] = 0
    x[5, 10] = 1e4  # outlier row
    q, s = dynamic_quant(x)
    q_ref, s_ref = np_dynamic_quant(x.numpy())
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    np.testing.assert_array_equal(q.numpy(), q_ref)
    np.testing.assert_array_equal(s.numpy(), s_ref)
    assert s[2] == 1 and bool((q[2] == 0).all())
    assert bool((q.abs().amax(dim=-1)[torch.arange(400) != 2] == 127).all())


def test_dynamic_quant_rounds_half_to_even():
    # amax 127 -> s = 1 exactly, so x / s are exact ties.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -3.5, 126.5]])
    q, s = dynamic_quant(x)
    assert s.tolist() == [1.0]
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, 4, -4, 126]


def test_dynamic_quant_reaches_minus_128():
    # Subnormal amax: 190 ulp / 127 rounds to 1 ulp, so x / s = -190 and the clamp at -128 (not -127) bites.
    tiny = float(np.float32(np.ldexp(190.0, -149)))
    x = torch.tensor([[-tiny, tiny / 2, 0.0], [tiny, 0.0, -tiny]], dtype=torch.float32)
    q, s = dynamic_quant(x)
    q_ref, s_ref = np_dynamic_quant(x.numpy())
    np.testing.assert_array_equal(q.numpy(), q_ref)
    np.testing.assert_array_equal(s.numpy(), s_ref)
    assert q[0, 0] == -128 and q[1, 0] == 127 and q[1, 2] == -128


def test_dynamic_quant_dtypes_and_leading_dims():
    x = (torch.randn(2, 3, 16, generator=_gen(2)) * 5).to(torch.bfloat16)
    q, s = dynamic_quant(x)
    assert q.shape == (2, 3, 16) and q.dtype == torch.int8
    assert s.shape == (2, 3) and s.dtype == torch.float32
    q_ref, s_ref = np_dynamic_quant(x.float().numpy())
    np.testing.assert_array_equal(q.numpy(), q_ref)
    np.testing.assert_array_equal(s.numpy(), s_ref)
    with pytest.raises(LayoutError, match="dynamic_quant.*'x'"):
        dynamic_quant(torch.zeros(2, 3, dtype=torch.int32))


# ---------------------------------------------------------------- swiglu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("left", [True, False])
def test_swiglu(dtype, left):
    x = (torch.randn(5, 24, generator=_gen(3)) * 4).to(dtype)
    y = swiglu(x, activate_left=left)
    assert y.dtype == dtype and y.shape == (5, 12)
    ref = torch.from_numpy(np_swiglu(x.float().numpy(), left))
    # exp may differ by an ulp between numpy and torch; bf16 output may then flip by one bf16 ulp.
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(y.float(), ref, **tol)


def test_swiglu_gate_is_first_half_by_default():
    x = torch.tensor([[100.0, -200.0, 2.0, 3.0]])  # silu(100) = 100 and silu(-200) = -0 exactly in fp32
    assert swiglu(x).tolist() == [[200.0, -0.0]]
    silu = [float(a / (1 + np.exp(-a))) for a in (2.0, 3.0)]  # gate = second half [2, 3]
    torch.testing.assert_close(
        swiglu(x, activate_left=False), torch.tensor([[100 * silu[0], -200 * silu[1]]])
    )


# ---------------------------------------------------------------- dequant_swiglu_quant
def _silu_exact_gate(x: torch.Tensor, half: int) -> None:
    """Move gate values out of (-110, 20): there silu(a) is exactly a or -0 in fp32 (exp is 0 or inf),
    so the reference is bit-exact whatever exp implementation numpy and torch use."""
    gate = x[:, :half]
    gate += torch.sign(gate) * 110  # in place: makes |gate| >= 110


def test_dequant_swiglu_quant_exact_order():
    counts = [3, 0, 4, 2]
    rows, i2 = 11, 32  # 2 trailing rows past sum(counts)
    g = _gen(4)
    ws = torch.rand(4, i2, generator=g) * 0.5 + 0.5
    act = torch.rand(rows, generator=g) + 0.5
    # h = x * ws * act: choose fp32 x so that |h_gate| >= 110 * 0.25, i.e. well inside the exact regime
    xf = torch.randint(-400_000, 400_000, (rows, i2), generator=g).float()
    _silu_exact_gate(xf, i2 // 2)
    x = xf.to(torch.int32)
    x[4] = 0  # a zero row inside expert 2
    q, s = dequant_swiglu_quant(x, ws, act, torch.tensor(counts))
    v = sum(counts)
    e = np_expert_rows(counts)
    h = x[:v].numpy().astype(F32) * ws.numpy()[e] * act.numpy()[:v, None]
    assert np.all((np.abs(h[:, : i2 // 2]) >= 20) | (h[:, : i2 // 2] == 0))
    q_ref, s_ref = np_dynamic_quant(np_swiglu(h))
    np.testing.assert_array_equal(q[:v].numpy(), q_ref)
    np.testing.assert_array_equal(s[:v].numpy(), s_ref)
    assert bool((q[v:] == 0).all()) and bool((s[v:] == 1).all())
    assert s[4] == 1 and bool((q[4] == 0).all())


def test_dequant_swiglu_quant_general_values():
    counts = [5, 2]
    g = _gen(16)
    x = torch.randint(-200_000, 200_000, (8, 64), generator=g, dtype=torch.int32)
    ws = torch.rand(2, 64, generator=g) * 1e-4
    act = torch.rand(8, generator=g) * 1e-2  # |h| ~ 0..2: silu in its curved region
    q, s = dequant_swiglu_quant(x, ws, act, torch.tensor(counts))
    e = np_expert_rows(counts)
    h = x[:7].numpy().astype(F32) * ws.numpy()[e] * act.numpy()[:7, None]
    q_ref, s_ref = np_dynamic_quant(np_swiglu(h))
    np.testing.assert_allclose(s[:7].numpy(), s_ref, rtol=1e-6)
    diff = np.abs(q[:7].numpy().astype(int) - q_ref)
    assert diff.max() <= 1 and (diff != 0).mean() < 0.01  # only exp-ulp-induced tie flips
    assert s[7] == 1


# ---------------------------------------------------------------- swiglu_clip_quant
def np_swiglu_clip_quant(x: np.ndarray, counts, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spec 1.4 steps 1-4 in numpy float32 on the valid rows."""
    y = np_swiglu(x[: sum(counts)].astype(F32))
    r = np.abs(y).max(axis=-1)
    t = (alpha.astype(F32)[np_expert_rows(counts)] * r).astype(F32)
    y_c = np.clip(y, -t[:, None], t[:, None])
    return np_quant_rows(y_c, t)


def test_peer_criterion_helper():
    golden = np.array([5.0, -3.0, 100.0, 0.0])
    assert peer_ok(golden, golden)[0]
    assert not peer_ok(golden + [1, 0, 0, 0], golden)[0]  # 1 LSB at |q| < 10 fails
    assert peer_ok(golden + [0, 0, 1, 0.005], golden)[0]  # 1 % at 100; abs < 0.01 counts as 0


def test_swiglu_clip_quant_peer_case():
    torch.manual_seed(0)
    x = (torch.rand(5000, 4096) * 2e5 - 1e5).to(torch.bfloat16)
    counts = [10, 1000, 2000, 500]
    alpha = torch.tensor([0.12, 0.532, 0.927, 0.5], dtype=torch.float32)
    q, s = swiglu_clip_quant(x, torch.tensor(counts), alpha)
    assert q.shape == (5000, 2048) and q.dtype == torch.int8
    assert s.shape == (5000,) and s.dtype == torch.float32
    v = sum(counts)
    q_ref, s_ref = np_swiglu_clip_quant(x.float().numpy(), counts, alpha.numpy())
    for name, got, want in (("q", q[:v].numpy(), q_ref), ("scale", s[:v].numpy(), s_ref)):
        ok, frac, worst = peer_ok(got, want)
        assert ok, f"{name}: {frac:.4%} elements over 1 %, worst rel diff {worst}"
        print(f"peer case {name}: {frac:.6%} elements over 1 %, worst rel diff {worst:.3g}")
    assert bool((q[v:] == 0).all()) and bool((s[v:] == 1).all())

    # alpha = 1 is exactly plain dynamic quant of the fp32 SwiGLU output.
    q1, s1 = swiglu_clip_quant(x, torch.tensor(counts), torch.ones(4))
    qd, sd = dynamic_quant(swiglu(x[:v].float()))
    assert torch.equal(q1[:v], qd) and torch.equal(s1[:v], sd)


def test_swiglu_clip_quant_small_exact():
    counts = [2, 0, 300, 100]
    g = _gen(5)
    x = torch.randn(405, 512, generator=g) * 1000
    _silu_exact_gate(x, 256)
    x[3] = 0  # zero row: scale 1, q 0
    alpha = torch.tensor([0.3, 0.9, 1.0, 0.55])
    q, s = swiglu_clip_quant(x.to(torch.bfloat16), torch.tensor(counts), alpha)
    q_ref, s_ref = np_swiglu_clip_quant(x.to(torch.bfloat16).float().numpy(), counts, alpha.numpy())
    np.testing.assert_array_equal(q[:402].numpy(), q_ref)
    np.testing.assert_array_equal(s[:402].numpy(), s_ref)
    assert s[3] == 1 and bool((q[3] == 0).all())
    assert bool((q[402:] == 0).all()) and bool((s[402:] == 1).all())
    # the clip saturates: with alpha 0.3 the largest elements all hit +-127.
    assert int((q[:2].abs() == 127).sum()) > 2


# ---------------------------------------------------------------- int4 packing
def np_pack(q: np.ndarray) -> np.ndarray:
    lo = q[..., 0::2, :].astype(np.int64) & 0xF
    hi = q[..., 1::2, :].astype(np.int64) & 0xF
    return (lo | (hi << 4)).astype(np.uint8).view(np.int8)


def np_unpack_int32(w: np.ndarray) -> np.ndarray:
    u = w.astype(np.int64) & 0xFFFFFFFF
    nib = np.stack([(u >> (4 * i)) & 0xF for i in range(8)], axis=-1)
    nib = np.where(nib >= 8, nib - 16, nib)
    return nib.reshape(*w.shape[:-1], w.shape[-1] * 8).astype(np.int8)


@st.composite
def int4_tensors(draw, n_multiple: int = 2):
    lead = draw(st.lists(st.integers(1, 3), max_size=2))
    n = draw(st.integers(1, 6)) * n_multiple
    k = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    return torch.randint(-8, 8, (*lead, n, k), generator=_gen(seed), dtype=torch.int8)


@PROP
@given(int4_tensors())
def test_pack_unpack_round_trip(q):
    packed = pack_int4(q)
    assert packed.dtype == torch.int8 and packed.shape == (*q.shape[:-2], q.shape[-2] // 2, q.shape[-1])
    np.testing.assert_array_equal(packed.numpy(), np_pack(q.numpy()))
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(pack_int4(q.to(torch.int64)), packed)


@PROP
@given(int4_tensors(n_multiple=8))
def test_on_disk_to_int32_view_consistency(q):
    packed_t = pack_int4(q).transpose(-1, -2)  # post-load transpose: [..., K, N/2]
    w = int4_weight_to_int32(packed_t)
    assert w.dtype == torch.int32 and w.shape == (*q.shape[:-2], q.shape[-1], q.shape[-2] // 8)
    np.testing.assert_array_equal(np_unpack_int32(w.numpy()), q.transpose(-1, -2).numpy())
    assert torch.equal(unpack_int4_int32(w), q.transpose(-1, -2))


def test_unpack_int4_int32_nibble_order():
    w = torch.tensor([[0x76543210, -0x789ABCDF]], dtype=torch.int32)  # second = 0x87654321
    assert unpack_int4_int32(w)[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6, 7, -8]


def test_pack_int4_rejects_bad_input():
    with pytest.raises(LayoutError, match="pack_int4.*'q'.*even"):
        pack_int4(torch.zeros(3, 4, dtype=torch.int8))
    with pytest.raises(LayoutError, match=r"pack_int4.*'q'.*\[-8, 7\]"):
        pack_int4(torch.full((2, 4), 8, dtype=torch.int8))
    with pytest.raises(LayoutError, match="int4_weight_to_int32.*'packed_t'"):
        int4_weight_to_int32(torch.zeros(4, 6, dtype=torch.int8))


# ---------------------------------------------------------------- UINT64 scales
_F32_EDGE = [0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38, -3.4028235e38, 1.0, -2.5]


@PROP
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=40))
def test_u64_encode_decode_round_trip(values):
    s = torch.tensor(values + _F32_EDGE, dtype=torch.float32)
    word = encode_scale_u64(s)
    assert word.dtype == torch.int64 and word.shape == s.shape
    assert bool((word >> 32 == 0).all())  # high 32 bits zero
    np.testing.assert_array_equal(word.numpy(), s.numpy().view(np.uint32).astype(np.int64))
    back = decode_scale_u64(word)
    assert back.dtype == torch.float32
    assert torch.equal(back.view(torch.int32), s.view(torch.int32))  # bitwise, keeps -0.0


def test_u64_decode_ignores_high_bits_and_keeps_shape():
    s = torch.tensor([[1.5, -3.0], [0.0, 2.0]], dtype=torch.float32)
    word = encode_scale_u64(s) | (0x1234 << 40)
    assert torch.equal(decode_scale_u64(word), s)


def test_meta_tensors_for_shape_planning():
    s = torch.empty(4, 1, 16, device="meta")
    word = encode_scale_u64(s)
    assert word.is_meta and word.dtype == torch.int64 and word.shape == (4, 1, 16)
    packed = torch.empty(4, 16, 64, dtype=torch.int8, device="meta")  # on-disk [E, N/2, K]
    w = int4_weight_to_int32(packed.transpose(-1, -2))
    assert w.is_meta and w.dtype == torch.int32 and w.shape == (4, 64, 4)
    p = pack_int4(torch.empty(4, 32, 64, dtype=torch.int8, device="meta"))
    assert p.is_meta and p.shape == (4, 16, 64)


# ---------------------------------------------------------------- grouped matmuls
def np_a8w8_acc(x: np.ndarray, w: np.ndarray, counts) -> np.ndarray:
    """int64 accumulator per expert block; zero past sum(counts)."""
    out = np.zeros((x.shape[0], w.shape[2]), dtype=np.int64)
    e = np_expert_rows(counts)
    for m in range(len(e)):
        out[m] = x[m].astype(np.int64) @ w[e[m]].astype(np.int64)
    return out


def _a8w8_case(seed, counts, rows, k, n, lo=-128, hi=128):
    g = _gen(seed)
    x = torch.randint(lo, hi, (rows, k), generator=g, dtype=torch.int8)
    w = torch.randint(lo, hi, (len(counts), k, n), generator=g, dtype=torch.int8)
    return x, w


def test_a8w8_raw_accumulator_uneven_counts():
    counts = [3, 0, 5, 2, 0]
    x, w = _a8w8_case(6, counts, 12, 300, 24)
    acc = grouped_matmul_a8w8(x, w, None, None, torch.tensor(counts))
    assert acc.dtype == torch.int32 and acc.shape == (12, 24)
    np.testing.assert_array_equal(acc.numpy(), np_a8w8_acc(x.numpy(), w.numpy(), counts))
    assert bool((acc[10:] == 0).all())


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_a8w8_scaled(scale_dtype, with_bias):
    counts = [4, 0, 3]
    x, w = _a8w8_case(7, counts, 9, 200, 16)
    g = _gen(8)
    scale = (torch.rand(3, 16, generator=g) * 1e-3).to(scale_dtype)
    pts = torch.rand(9, generator=g) * 1e-2
    bias = torch.randn(3, 16, generator=g) if with_bias else None
    v = sum(counts)
    e = np_expert_rows(counts)
    acc = np_a8w8_acc(x.numpy(), w.numpy(), counts)[:v].astype(F32)
    ref = acc * scale.float().numpy()[e] * pts.numpy()[:v, None]
    if with_bias:
        ref = ref + bias.numpy()[e]
    out32 = grouped_matmul_a8w8(x, w, scale, pts, torch.tensor(counts), bias, output_dtype=torch.float32)
    np.testing.assert_array_equal(out32[:v].numpy(), ref)
    out = grouped_matmul_a8w8(x, w, scale, pts, torch.tensor(counts), bias)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[:v], torch.from_numpy(ref).to(torch.bfloat16))
    assert bool((out[v:] == 0).all())


@pytest.mark.parametrize("xv,wv", [(-128, -128), (-127, -127), (127, -128)])
def test_a8w8_worst_case_magnitude_exact(xv, wv):
    k, n = 16384, 8  # |acc| up to 2^28; a plain fp32 GEMM would round the odd-valued cases
    x = torch.full((3, k), xv, dtype=torch.int8)
    w = torch.full((1, k, n), wv, dtype=torch.int8)
    acc = grouped_matmul_a8w8(x, w, None, None, torch.tensor([3]))
    assert bool((acc == xv * wv * k).all())


def test_a8w8_large_k_random_near_extreme():
    counts = [2, 3]
    x, w = _a8w8_case(9, counts, 5, 16384 + 300, 8, lo=-128, hi=-100)  # ragged last K chunk
    acc = grouped_matmul_a8w8(x, w, None, None, torch.tensor(counts))
    np.testing.assert_array_equal(acc.numpy(), np_a8w8_acc(x.numpy(), w.numpy(), counts))


def _a8w4_case(seed, counts, rows, k, n, n_kgroups, xlo=-128, xhi=128, wlo=-8, whi=8):
    """Random int8 x, int4 q [G, K, N] (post-load orientation) and its int32 view, fp32 scales [G, KG, N]."""
    g = _gen(seed)
    x = torch.randint(xlo, xhi, (rows, k), generator=g, dtype=torch.int8)
    q = torch.randint(wlo, whi, (len(counts), k, n), generator=g, dtype=torch.int8)
    w32 = int4_weight_to_int32(pack_int4(q.transpose(-1, -2)).transpose(-1, -2))
    s = torch.rand(len(counts), n_kgroups, n, generator=g) * 1e-2 + 1e-4
    return x, q, w32, s


def np_a8w4(x, q, s, bias, pts, counts) -> np.ndarray:
    """Spec formula, float32 valid rows: per-group int64 partials of (x-8)@W, times S, summed over groups."""
    v = sum(counts)
    e = np_expert_rows(counts)
    k, n_kgroups = q.shape[1], s.shape[1]
    gs = k // n_kgroups
    xs = x[:v].astype(np.int64) - 8
    out = np.zeros((v, q.shape[2]), dtype=F32)
    for m in range(v):
        y = None
        for gi in range(n_kgroups):
            part = (
                xs[m, gi * gs : (gi + 1) * gs] @ q[e[m], gi * gs : (gi + 1) * gs].astype(np.int64)
            ).astype(F32)
            y = part * s[e[m], gi] if y is None else y + part * s[e[m], gi]
        out[m] = (y + bias[e[m]]) * pts[m]
    return out


@pytest.mark.parametrize("n_kgroups", [1, 2, 4])  # per-channel, gs = 256, gs = 128
def test_a8w4_matches_formula(n_kgroups):
    counts = [3, 0, 5, 1]
    rows, k, n = 11, 512, 24
    x, q, w32, s = _a8w4_case(10, counts, rows, k, n, n_kgroups)
    g = _gen(11)
    bias = torch.randn(4, n, generator=g)
    pts = torch.rand(rows, generator=g) * 1e-2
    v = sum(counts)
    ref = np_a8w4(x.numpy(), q.numpy(), s.numpy(), bias.numpy(), pts.numpy(), counts)
    args = (x, w32, encode_scale_u64(s), bias, pts, torch.tensor(counts))
    out32 = grouped_matmul_a8w4(*args, output_dtype=torch.float32)
    np.testing.assert_array_equal(out32[:v].numpy(), ref)
    out = grouped_matmul_a8w4(*args)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    assert torch.equal(out[:v], torch.from_numpy(ref).to(torch.bfloat16))
    assert bool((out[v:] == 0).all())


@pytest.mark.parametrize("xv,wv", [(-128, -8), (-127, -7)])
def test_a8w4_worst_case_per_channel_k18432_exact(xv, wv):
    k, n = 18432, 16  # spec's max K; |sum| = 136 * 8 * 18432 > 2^24
    x = torch.full((2, k), xv, dtype=torch.int8)
    q = torch.full((1, k, n), wv, dtype=torch.int8)
    w32 = int4_weight_to_int32(pack_int4(q.transpose(-1, -2)).transpose(-1, -2))
    ones = encode_scale_u64(torch.ones(1, 1, n))
    out = grouped_matmul_a8w4(
        x, w32, ones, torch.zeros(1, n), torch.ones(2), torch.tensor([2]), output_dtype=torch.float32
    )
    expected = (xv - 8) * wv * k  # representable in fp32 for these values
    assert float(np.float32(expected)) == expected
    assert bool((out == expected).all())


def test_a8w4_k18432_random_near_extreme_exact():
    counts = [2, 1]
    k, n = 18432, 8
    x, q, w32, _ = _a8w4_case(12, counts, 3, k, n, 1, xlo=-128, xhi=-119, wlo=-8, whi=-5)
    ones = encode_scale_u64(torch.ones(2, 1, n))
    out = grouped_matmul_a8w4(
        x, w32, ones, torch.zeros(2, n), torch.ones(3), torch.tensor(counts), output_dtype=torch.float32
    )
    e = np_expert_rows(counts)
    exact = np.stack(
        [(x[m].numpy().astype(np.int64) - 8) @ q[e[m]].numpy().astype(np.int64) for m in range(3)]
    )
    assert int(np.abs(exact).max()) > 2**24
    np.testing.assert_array_equal(out.numpy(), exact.astype(F32))


@pytest.mark.parametrize("n_kgroups", [1, 2])
def test_a8w4_bias_contract_cancels_shift(n_kgroups):
    """With bias = 8 * sum_k W*S the output is per_token_scale * sum_k x*W*S (the spec's (x-8) identity)."""
    counts = [5, 7]
    rows, k, n = 12, 512, 16
    x, q, w32, s = _a8w4_case(13, counts, rows, k, n, n_kgroups)
    pts = torch.rand(rows, generator=_gen(14)) * 1e-2 + 1e-3
    gs = k // n_kgroups
    s_full = np.repeat(s.numpy().astype(np.float64), gs, axis=1)  # [G, K, N]
    ws = q.numpy().astype(np.float64) * s_full
    bias = 8 * ws.sum(axis=1)  # [G, N], float64
    out = grouped_matmul_a8w4(
        x, w32, encode_scale_u64(s), torch.from_numpy(bias).float(), pts, torch.tensor(counts)
    )
    e = np_expert_rows(counts)
    ideal = np.stack([x[m].numpy().astype(np.float64) @ ws[e[m]] for m in range(rows)]) * pts.numpy()[:, None]
    np.testing.assert_allclose(out.float().numpy(), ideal, rtol=1e-2, atol=1e-2 * np.abs(ideal).max())


# ---------------------------------------------------------------- argument validation
def _valid_a8w4():
    x, _, w32, s = _a8w4_case(15, [2, 2], 4, 256, 16, 1)
    return dict(
        x=x,
        weight=w32,
        scale=encode_scale_u64(s),
        bias=torch.zeros(2, 16),
        per_token_scale=torch.ones(4),
        group_list=torch.tensor([2, 2]),
    )


@pytest.mark.parametrize(
    "arg,bad",
    [
        ("bias", None),
        ("bias", torch.zeros(2, 8)),
        ("weight", torch.zeros(2, 128, 2, dtype=torch.int32)),  # K mismatch
        ("weight", torch.zeros(2, 256, 2, dtype=torch.int8)),  # dtype
        ("scale", torch.zeros(2, 3, 16, dtype=torch.int64)),  # 3 groups do not divide K = 256
        ("scale", torch.zeros(2, 1, 8, dtype=torch.int64)),  # N mismatch
        ("scale", torch.zeros(2, 1, 16, dtype=torch.float32)),  # not u64-encoded
        ("per_token_scale", torch.ones(3)),
        ("group_list", torch.tensor([2, 2, 0])),  # len != G
        ("group_list", torch.tensor([3, 2])),  # sum > T
        ("group_list", torch.tensor([2, 2], dtype=torch.int32)),
    ],
)
def test_a8w4_validation(arg, bad):
    kwargs = _valid_a8w4()
    grouped_matmul_a8w4(**kwargs)  # the valid baseline runs
    kwargs[arg] = bad
    with pytest.raises(LayoutError, match=f"grouped_matmul_a8w4: argument '{arg}'"):
        grouped_matmul_a8w4(**kwargs)


def test_a8w8_and_activation_validation():
    x = torch.zeros(4, 32, dtype=torch.int8)
    w = torch.zeros(2, 32, 8, dtype=torch.int8)
    counts = torch.tensor([2, 2])
    with pytest.raises(LayoutError, match="grouped_matmul_a8w8: argument 'weight'"):
        grouped_matmul_a8w8(x, w[:, :16], None, None, counts)
    with pytest.raises(LayoutError, match="grouped_matmul_a8w8: argument 'scale'"):
        grouped_matmul_a8w8(x, w, torch.ones(2, 4), torch.ones(4), counts)
    with pytest.raises(LayoutError, match="grouped_matmul_a8w8: argument 'per_token_scale'"):
        grouped_matmul_a8w8(x, w, torch.ones(2, 8), torch.ones(5), counts)
    with pytest.raises(LayoutError, match="grouped_matmul_a8w8: argument 'group_list'"):
        grouped_matmul_a8w8(x, w, None, None, torch.tensor([2, 2, 1]))
    with pytest.raises(LayoutError, match="swiglu_clip_quant: argument 'x'"):
        swiglu_clip_quant(torch.zeros(4, 7), counts, torch.ones(2))
    with pytest.raises(LayoutError, match="swiglu_clip_quant: argument 'group_index'"):
        swiglu_clip_quant(torch.zeros(4, 8), torch.tensor([2, 2, 2]), torch.ones(3))
    with pytest.raises(LayoutError, match="dequant_swiglu_quant: argument 'weight_scale'"):
        dequant_swiglu_quant(torch.zeros(4, 8, dtype=torch.int32), torch.ones(2, 6), torch.ones(4), counts)
    with pytest.raises(LayoutError, match="dequant_swiglu_quant: argument 'activation_scale'"):
        dequant_swiglu_quant(torch.zeros(4, 8, dtype=torch.int32), torch.ones(2, 8), torch.ones(2), counts)
