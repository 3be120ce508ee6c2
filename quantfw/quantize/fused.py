"""Min-max per-channel quantization of big weights, and FP8 block dequantization, as compiled
CPU kernels.

The same ops as `primitives.quantize_per_channel` on the same values (FP8 block dequantization,
amax per row, divide, round half-to-even, clamp), compiled by torch.compile's CPU backend into
one pass over the weight instead of one pass per op: bit-identical results (tested), about 5x the
eager speed on a DeepSeek expert projection (docs/scale.md). `emulate_precision_casts` keeps
inductor from skipping the roundings the eager ops do.

The kernel can also produce what a format's encoders would compute next from (q, s) while q is
still in cache (ENCODINGS): the int4 packing of `ops.pack_int4` and the sums of
`primitives.a8w4_bias`. Integer packing is exact; the bias sums are exact in any summation order
when every bf16 product is a multiple of one power of two and their sum stays below 2^24 of it
(K * qmax * 256 <= 2^24), so the kernel's reduction order gives the eager bits (tested).

FP8 dequantization (`dequantize_fp8_into`) writes w.float() x its block's scale_inv straight into
the caller's buffer in one pass: the same single fp32 product per element as the eager
`quantfw.io.fp8.dequantize`, so the same bits (tested), about 3-9x faster on a DeepSeek expert
projection (the eager ops page-fault a fresh fp32 copy, then copy it again into the block).

Only weights of at least MIN_ELEMS elements take these paths (compiling costs seconds per shape,
cached on disk by inductor across runs); smaller ones, odd block tilings, and machines where
compilation fails use the eager primitives.
"""

from __future__ import annotations

import sys

import torch

MIN_ELEMS = 1 << 20
_QMAX = {8: 127, 4: 7}
# What the kernel can compute beyond (q, s), by the name of the eager op it replaces.
ENCODINGS = ("pack_int4", "a8w4_bias")
_compiled: dict[tuple[bool, bool] | str, object] = {}
_disabled: str | None = None


def _kernel(
    w: torch.Tensor, scale_inv: torch.Tensor | None, qmax: int, bn: int, bk: int, pack: bool, bias: bool
):
    n, k = w.shape
    wf = w.to(torch.float32)
    if scale_inv is not None:
        wf = (wf.view(n // bn, bn, k // bk, bk) * scale_inv[:, None, :, None]).view(n, k)
    s = wf.abs().amax(dim=-1) / qmax
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.div(wf, s[:, None]).round().clamp(-qmax, qmax).to(torch.int8)
    out = [q, s]
    if pack:  # ops.pack_int4: low nibble from even rows, signed high nibble from odd rows
        pairs = q.view(n // 2, 2, k)
        out.append(pairs[:, 1] * 16 + (pairs[:, 0] & 0xF))
    if bias:  # primitives.a8w4_bias before its overflow check: bf16 products, fp32 sums
        out.append(
            8 * (s.to(torch.bfloat16)[:, None] * q.to(torch.bfloat16)).sum(dim=-1, dtype=torch.float32)
        )
    return out


def _dequant_kernel(w: torch.Tensor, scale_inv: torch.Tensor, bn: int, bk: int, out: torch.Tensor) -> None:
    n, k = w.shape
    out.copy_((w.to(torch.float32).view(n // bn, bn, k // bk, bk) * scale_inv[:, None, :, None]).view(n, k))


def _configure() -> None:
    """torch.compile's settings for this kernel, in the calling thread: torch keeps them per
    thread, and the converter's worker threads compile and run the kernel."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.emulate_precision_casts = True
    # one compilation per weight shape and variant: a release has a dozen, more than the default 8
    # (past the limit dynamo would silently run the eager ops)
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)


def _compiled_kernel(pack: bool, bias: bool):
    _configure()
    if (pack, bias) not in _compiled:
        _compiled[pack, bias] = torch.compile(_kernel, dynamic=False)
    return _compiled[pack, bias]


def _disable(e: Exception) -> None:
    global _disabled
    _disabled = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    print(f"quantfw: compiled quantization unavailable ({_disabled}); using eager ops", file=sys.stderr)


def dequantize_fp8_into(
    w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], out: torch.Tensor
) -> bool:
    """out fp32 [N, K] = w (float8 [N, K]) x scale_inv fp32 of its bn x bk block, by the compiled
    kernel; False (out untouched) when it does not apply: small or edge-blocked weights, or no
    compiler. The caller (quantfw.io.fp8.dequantize) has checked scale_inv and out against w."""
    bn, bk = block
    if _disabled or w.dim() != 2 or w.numel() < MIN_ELEMS or w.shape[0] % bn or w.shape[1] % bk:
        return False
    try:
        _configure()
        if "dequant" not in _compiled:
            _compiled["dequant"] = torch.compile(_dequant_kernel, dynamic=False)
        _compiled["dequant"](w, scale_inv.to(torch.float32), bn, bk, out)
    except Exception as e:  # no C++ compiler, unsupported CPU: the eager ops give the same bits
        _disable(e)
        return False
    return True


def applies(w: torch.Tensor, bits: int, block: tuple[int, int] | None = None) -> bool:
    """Whether `quantize_per_channel_fused` takes the compiled path for this weight."""
    if _disabled or bits not in _QMAX or w.dim() != 2 or w.numel() < MIN_ELEMS:
        return False
    return block is None or (w.shape[0] % block[0] == 0 and w.shape[1] % block[1] == 0)


def _fusable(name: str, w: torch.Tensor, bits: int) -> bool:
    n, k = w.shape
    if name == "pack_int4":
        return bits == 4 and n % 2 == 0
    return name == "a8w4_bias" and k * _QMAX[bits] * 256 <= 1 << 24


def quantize_per_channel_encoded(
    w: torch.Tensor,
    bits: int,
    scale_inv: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
    encodings: tuple[str, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None:
    """(q int8 [N, K], s fp32 [N], {encoding: tensor}) of min-max per-channel quantization of
    w [N, K] (an FP8 weight with its block scale_inv, or a float weight), with those of
    `encodings` (names in ENCODINGS) the kernel can compute exactly for this weight; None when
    the compiled path does not apply."""
    if not applies(w, bits, block if scale_inv is not None else None):
        return None
    want = [e for e in ENCODINGS if e in encodings and _fusable(e, w, bits)]
    bn, bk = block or (1, 1)
    try:
        kernel = _compiled_kernel("pack_int4" in want, "a8w4_bias" in want)
        q, s, *extra = kernel(
            w,
            None if scale_inv is None else scale_inv.float(),
            _QMAX[bits],
            bn,
            bk,
            *(e in want for e in ENCODINGS),
        )
    except Exception as e:  # no C++ compiler, unsupported CPU: the eager ops give the same bits
        _disable(e)
        return None
    return q, s, dict(zip(want, extra))


def quantize_per_channel_fused(
    w: torch.Tensor, bits: int, scale_inv: torch.Tensor | None = None, block: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q int8 [N, K], s fp32 [N]) of `quantize_per_channel_encoded` without encodings."""
    out = quantize_per_channel_encoded(w, bits, scale_inv, block)
    return None if out is None else out[:2]
