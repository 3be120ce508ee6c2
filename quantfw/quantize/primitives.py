"""Weight-quantization primitives (spec section 9 "Quantizer defaults", sections 3 and 4).

Weights are float [..., N, K] (leading dims such as experts allowed). Rounding is half-to-even
(torch.round); a zero channel or group gets scale 1, never 0 or NaN. Scales are returned as fp32.

Every computation here is independent per output channel (row), so each function runs its
elementwise chain over blocks of rows sized to stay in the L2 cache: the same ops on the same
rows (bit-identical to the whole-tensor form), but each intermediate is written to cache instead of
to freshly page-faulted memory. That is ~5x faster on big weights (benchmarks/quantize_throughput.py).
"""

from __future__ import annotations

import torch

from quantfw.errors import ConfigError, LayoutError

MIN_BITS, MAX_BITS = 2, 8  # symmetric grids from {-1, 0, 1} to the int8 the stored weights hold
_BLOCK_ELEMS = 1 << 16  # elements per row block: fp32 intermediates of a few blocks fit in L2


def _row_blocks(rows: int, k: int):
    """Slices of consecutive rows, each about _BLOCK_ELEMS elements (at least one row)."""
    step = max(1, _BLOCK_ELEMS // max(k, 1))
    return [slice(r, min(rows, r + step)) for r in range(0, rows, step)]


def _check_weight(fn: str, arg: str, w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        found = list(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise LayoutError(f"{fn}: argument '{arg}' expected a tensor [..., N, K], found {found}")


def qmax(bits: int) -> int:
    """The largest level of a symmetric signed `bits`-bit grid (-qmax..qmax): 2^(bits-1) - 1."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"weight bits must be an int from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return (1 << (bits - 1)) - 1


def _nonzero(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s == 0, torch.ones_like(s), s)


def quantize_per_channel(
    w: torch.Tensor,
    bits: int,
    clip_ratio: float | torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quant: (q int8 [..., N, K], s fp32 [..., N]).

    s = amax_k|w| * clip_ratio / qmax (qmax = 2^(bits-1) - 1: 127 for 8 bits, 7 for 4; 0 -> 1),
    q = clamp(round_half_even(w / s), -qmax, qmax). clip_ratio is a scalar or a [..., N] tensor
    (a learned weight shrink). compute_dtype=bfloat16 reproduces the cann-recipes converter, which
    does these elementwise ops in bf16; s is then the bf16 value as fp32.
    """
    top = qmax(bits)
    _check_weight("quantize_per_channel", "w", w)
    k = w.shape[-1]
    if clip_ratio is None and compute_dtype == torch.float32:
        from quantfw.quantize.fused import quantize_per_channel_fused

        fast = quantize_per_channel_fused(w, bits)  # same bits, one compiled pass (big weights only)
        if fast is not None:
            return fast
    ratio = None
    if clip_ratio is not None:
        ratio = torch.as_tensor(clip_ratio, dtype=compute_dtype, device=w.device)
        if ratio.dim() and tuple(ratio.shape) != tuple(w.shape[:-1]):
            raise LayoutError(
                f"quantize_per_channel: argument 'clip_ratio' expected a scalar or shape {list(w.shape[:-1])}, "
                f"found {list(ratio.shape)}"
            )
        ratio = ratio.reshape(-1) if ratio.dim() else ratio
    w2 = w.reshape(-1, k)
    q = torch.empty(w2.shape, dtype=torch.int8, device=w.device)
    s_out = torch.empty(w2.shape[0], dtype=torch.float32, device=w.device)
    for b in _row_blocks(w2.shape[0], k):
        wc = w2[b].to(compute_dtype)
        lo, hi = torch.aminmax(wc, dim=-1)  # max(-min, max) == amax|w| exactly, NaN propagates
        s = torch.maximum(-lo, hi)
        if ratio is not None:
            s = s * (ratio[b] if ratio.dim() else ratio)
        s = _nonzero(s / top)
        q[b] = torch.div(wc, s.unsqueeze(-1)).round_().clamp_(-top, top)
        s_out[b] = s
    return q.reshape(w.shape), s_out.reshape(w.shape[:-1])


def quantize_two_level(
    w: torch.Tensor, group_size: int, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """msModelSlim two-level quant: (q int8 in +-qmax [..., N, K], s1 fp32 [..., N], s2 fp32 [..., N, K/G]).

    Stage 1 float -> int8 per channel: s1 = amax/127, q8 = clamp(round(w/s1), +-127).
    Stage 2 int8 -> `bits` per group (qmax 7 for int4): s2 = amax_group|q8| / qmax,
    q = clamp(round(q8/s2), +-qmax).
    Dequant: w ~= q * s2[g(k)] * s1. All fp32.
    """
    _check_weight("quantize_two_level", "w", w)
    top = qmax(bits)
    if bits >= MAX_BITS:
        raise ConfigError(f"quantize_two_level: bits={bits}: the second level must be narrower than int8")
    k = w.shape[-1]
    if group_size <= 0 or k % group_size:
        raise ConfigError(
            f"quantize_two_level: group_size {group_size} must be a positive divisor of K = {k} "
            "(use per-channel or another divisor)"
        )
    w2 = w.reshape(-1, k)
    rows, ng = w2.shape[0], k // group_size
    q = torch.empty(w2.shape, dtype=torch.int8, device=w.device)
    s1 = torch.empty(rows, dtype=torch.float32, device=w.device)
    s2 = torch.empty(rows, ng, dtype=torch.float32, device=w.device)
    for b in _row_blocks(rows, k):
        wf = w2[b].to(torch.float32)
        s1b = _nonzero(wf.abs().amax(dim=-1) / 127)
        q8g = torch.div(wf, s1b.unsqueeze(-1)).round_().clamp_(-127, 127).reshape(-1, ng, group_size)
        s2b = _nonzero(q8g.abs().amax(dim=-1) / top)
        q[b] = torch.div(q8g, s2b.unsqueeze(-1)).round_().clamp_(-top, top).reshape(-1, k)
        s1[b], s2[b] = s1b, s2b
    lead = w.shape[:-1]
    return q.reshape(w.shape), s1.reshape(lead), s2.reshape(*lead, ng)


def _expand_groups(s2: torch.Tensor, k: int) -> torch.Tensor:
    """Per-group scales [..., N, K/G] -> per-element [..., N, K]."""
    kg = s2.shape[-1]
    if kg == 0 or k % kg:
        raise LayoutError(f"scales: argument 's2' expected last dim dividing K = {k}, found {list(s2.shape)}")
    return torch.repeat_interleave(s2, k // kg, dim=-1)


def dequantize(q: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 dequant: q * s2[g(k)] * s1[n] (s2 omitted for per-channel)."""
    # In place on the one new tensor: a fresh multi-MB result per product costs more in page faults
    # than the product itself.
    deq = q.to(torch.float32) if q.dtype != torch.float32 else q.clone()
    if s2 is not None:
        deq.mul_(_expand_groups(s2.to(torch.float32), q.shape[-1]))
    return deq.mul_(s1.to(torch.float32).unsqueeze(-1))


def scale_bias_msmodelslim(
    q: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor | None = None, chunks: int = 1
) -> torch.Tensor:
    """msModelSlim `scale_bias` fp32 [..., N, chunks]: 8 * sum of deq over each of `chunks` K-chunks.

    deq = q * fp32(bf16(s2)) * fp32(bf16(s1)). gate/up use chunks=1, down uses 16 (one partial per
    chunk so a TP rank can sum the chunks of its own K slice).
    """
    k = q.shape[-1]
    if chunks <= 0 or k % chunks:
        raise ConfigError(f"scale_bias_msmodelslim: chunks {chunks} must divide K = {k}")
    bf = torch.bfloat16
    q2 = q.reshape(-1, k)
    s1b = s1.to(bf).to(torch.float32).reshape(-1)
    s2b = None
    if s2 is not None:
        if s2.shape[-1] == 0 or k % s2.shape[-1]:
            raise LayoutError(
                f"scales: argument 's2' expected last dim dividing K = {k}, found {list(s2.shape)}"
            )
        s2b = s2.to(bf).to(torch.float32).reshape(q2.shape[0], -1)
    out = torch.empty(q2.shape[0], chunks, dtype=torch.float32, device=q.device)
    for b in _row_blocks(q2.shape[0], k):
        deq = q2[b].to(torch.float32)
        if s2b is not None:
            deq = (deq.reshape(deq.shape[0], s2b.shape[1], -1) * s2b[b].unsqueeze(-1)).reshape(deq.shape)
        deq = deq.mul_(s1b[b].unsqueeze(-1))
        out[b] = deq.reshape(deq.shape[0], chunks, k // chunks).sum(dim=-1)
    out = 8 * out

    def exact(rows):
        deq = q2[rows].double()
        if s2b is not None:
            deq = (deq.reshape(deq.shape[0], s2b.shape[1], -1) * s2b[rows].double().unsqueeze(-1)).reshape(
                deq.shape
            )
        deq = deq * s1b[rows].double().unsqueeze(-1)
        return 8 * deq.reshape(deq.shape[0], chunks, k // chunks).sum(dim=-1)

    return _redo_overflowed(out, exact).reshape(*q.shape[:-1], chunks)


def _redo_overflowed(out: torch.Tensor, exact) -> torch.Tensor:
    """Rows of an fp32 result [R, ...] that overflowed (weights near the float max), recomputed
    by `exact(rows)` in fp64; a value that still exceeds fp32 stays inf for the caller to refuse."""
    bad = ~torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=-1)
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(-1)
        out[rows] = exact(rows).to(torch.float32)
    return out


def a8w4_bias(
    q: torch.Tensor,
    s: torch.Tensor,
    compute_dtype: torch.dtype = torch.bfloat16,
    sum_dtype: torch.dtype = torch.float32,
    sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """W4A8-clip stored bias fp32 [..., N] = 8 * sum_k s[n] * q[n, k].

    The product is formed in compute_dtype (bf16 in the cann-recipes converter), the sum is
    accumulated in fp32 and rounded to sum_dtype (the converter's bf16 sum output: sum_dtype=bf16).
    sums: these 8 * fp32 sums already computed (quantize/fused.py); only the rest runs.
    """
    k = q.shape[-1]
    q2 = q.reshape(-1, k)
    sc = s.to(compute_dtype).reshape(-1)
    if sums is not None:
        out = sums.reshape(-1).clone()
    else:
        out = torch.empty(q2.shape[0], dtype=torch.float32, device=q.device)
        for b in _row_blocks(q2.shape[0], k):
            prod = sc[b].unsqueeze(-1) * q2[b].to(compute_dtype)
            out[b] = prod.sum(dim=-1, dtype=torch.float32)
        out = 8 * out
    if sum_dtype != torch.float32:
        out = out.to(sum_dtype).to(torch.float32)  # x8 is exact, so bf16(8 * sum) = 8 * bf16(sum)

    def exact(rows):
        # the compute_dtype products where they are finite, fp64 ones where they overflowed
        q64, s64 = q2[rows].double(), s.reshape(-1)[rows].double().unsqueeze(-1)
        prod = (sc[rows].unsqueeze(-1) * q2[rows].to(compute_dtype)).double()
        return 8 * torch.where(torch.isfinite(prod), prod, s64 * q64).sum(dim=-1)

    return _redo_overflowed(out, exact).reshape(q.shape[:-1])


def fuse_scales_fp16(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """NPU fused A8W4 scale fp32 [..., K/G, N] = fp32(fp16(s1 * s2)), transposed to group-major."""
    if s2.shape[:-1] != s1.shape:
        raise LayoutError(
            f"fuse_scales_fp16: argument 's2' expected shape {list(s1.shape)} + [K/G], found {list(s2.shape)}"
        )
    fused = (s1.to(torch.float32).unsqueeze(-1) * s2.to(torch.float32)).to(torch.float16).to(torch.float32)
    return fused.transpose(-1, -2).contiguous()
