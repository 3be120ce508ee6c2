"""Min-max per-channel quantization of big weights as one compiled CPU kernel.

The same ops as `primitives.quantize_per_channel` on the same values (FP8 block dequantization,
amax per row, divide, round half-to-even, clamp), compiled by torch.compile's CPU backend into
one pass over the weight instead of one pass per op: bit-identical results (tested), about 5x the
eager speed on a DeepSeek expert projection (docs/scale.md). `emulate_precision_casts` keeps
inductor from skipping the roundings the eager ops do.

Only weights of at least MIN_ELEMS elements take this path (compiling costs seconds per shape,
cached on disk by inductor across runs); smaller ones, odd block tilings, and machines where
compilation fails use the eager primitives.
"""

from __future__ import annotations

import sys

import torch

MIN_ELEMS = 1 << 20
_QMAX = {8: 127, 4: 7}
_compiled = None
_disabled: str | None = None


def _kernel(w: torch.Tensor, scale_inv: torch.Tensor | None, qmax: int, bn: int, bk: int):
    n, k = w.shape
    wf = w.to(torch.float32)
    if scale_inv is not None:
        wf = (wf.view(n // bn, bn, k // bk, bk) * scale_inv[:, None, :, None]).view(n, k)
    s = wf.abs().amax(dim=-1) / qmax
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.div(wf, s[:, None]).round().clamp(-qmax, qmax).to(torch.int8)
    return q, s


def _compiled_kernel():
    global _compiled
    if _compiled is None:
        import torch._inductor.config as inductor_config

        inductor_config.emulate_precision_casts = True
        _compiled = torch.compile(_kernel, dynamic=False)
    return _compiled


def applies(w: torch.Tensor, bits: int, block: tuple[int, int] | None = None) -> bool:
    """Whether `quantize_per_channel_fused` takes the compiled path for this weight."""
    if _disabled or bits not in _QMAX or w.dim() != 2 or w.numel() < MIN_ELEMS:
        return False
    return block is None or (w.shape[0] % block[0] == 0 and w.shape[1] % block[1] == 0)


def quantize_per_channel_fused(
    w: torch.Tensor, bits: int, scale_inv: torch.Tensor | None = None, block: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q int8 [N, K], s fp32 [N]) of min-max per-channel quantization of w [N, K] (an FP8 weight
    with its block scale_inv, or a float weight); None when the compiled path does not apply."""
    global _disabled
    if not applies(w, bits, block if scale_inv is not None else None):
        return None
    bn, bk = block or (1, 1)
    try:
        return _compiled_kernel()(w, None if scale_inv is None else scale_inv.float(), _QMAX[bits], bn, bk)
    except Exception as e:  # no C++ compiler, unsupported CPU: the eager ops give the same bits
        _disabled = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"quantfw: compiled quantization unavailable ({_disabled}); using eager ops", file=sys.stderr)
        return None
