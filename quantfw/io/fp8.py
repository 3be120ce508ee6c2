"""FP8 releases (DeepSeek-V3/V3.2, Kimi-K2): block-scaled float8_e4m3fn weights (spec section 12).

Every FP8 linear weight `<m>.weight` [N, K] has an fp32 companion `<m>.weight_scale_inv`
[ceil(N/bn), ceil(K/bk)] (block bn x bk = config.json `quantization_config.weight_block_size`,
128 x 128 in every release); edge blocks are partial. w = fp8.float() * scale_inv of its block.
Dequantization is one fp32 product per element, exact in the sense that no other rounding happens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from quantfw.errors import CheckpointError

FP8_DTYPES = (torch.float8_e4m3fn,)
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


def scale_key(weight_key: str) -> str:
    """`...proj.weight` -> `...proj.weight_scale_inv`."""
    return weight_key + SCALE_SUFFIX


def is_scale_key(key: str) -> bool:
    return key.endswith(SCALE_SUFFIX)


def block_size(config: Mapping[str, Any], where: str) -> tuple[int, int]:
    """The weight block of an FP8 release from its config.json (128 x 128 when not stated)."""
    qc = config.get("quantization_config")
    if not isinstance(qc, Mapping) or qc.get("quant_method") != "fp8":
        return DEFAULT_BLOCK
    block = qc.get("weight_block_size", list(DEFAULT_BLOCK))
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and 0 < b <= 4096 for b in block)
    ):
        raise CheckpointError(
            f"{where}: quantization_config.weight_block_size={block!r} (expected two positive ints, e.g. [128, 128])"
        )
    return block[0], block[1]


def check_scale(
    weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], block: tuple[int, int], where: str
) -> None:
    """A one-line error naming the tensor when a scale_inv does not tile its weight with `block`."""
    if len(weight_shape) != 2:
        raise CheckpointError(f"{where}: FP8 weight has shape {list(weight_shape)}, expected 2-D [N, K]")
    n, k = weight_shape
    want = (math.ceil(n / block[0]), math.ceil(k / block[1]))
    if tuple(scale_shape) != want:
        raise CheckpointError(
            f"{where}: {SCALE_SUFFIX} has shape {list(scale_shape)}, expected {list(want)} "
            f"for weight {list(weight_shape)} in {block[0]}x{block[1]} blocks (config weight_block_size)"
        )


def dequantize(
    w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK, where: str = "fp8 weight"
) -> torch.Tensor:
    """fp32 [N, K] = fp8 weight x its block's scale_inv (one fp32 multiply per element)."""
    check_scale(tuple(w.shape), tuple(scale_inv.shape), block, where)
    n, k = w.shape
    bn, bk = block
    out = w.to(torch.float32)
    s = scale_inv.to(torch.float32).repeat_interleave(bn, dim=0)[:n]  # [N, ceil(K/bk)]
    full = k // bk
    if full:
        out[:, : full * bk].view(n, full, bk).mul_(s[:, :full, None])
    if k % bk:
        out[:, full * bk :].mul_(s[:, full : full + 1])
    return out
