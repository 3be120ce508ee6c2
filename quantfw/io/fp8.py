"""FP8 releases (DeepSeek-V3/V3.2, Kimi-K2): block-scaled float8_e4m3fn weights (spec section 12).

Every FP8 linear weight `<m>.weight` [N, K] has an fp32 companion `<m>.weight_scale_inv`
[ceil(N/bn), ceil(K/bk)] (block bn x bk = config.json `quantization_config.weight_block_size`,
128 x 128 in every release); edge blocks are partial. w = fp8.float() * scale_inv of its block.
Dequantization is one fp32 product per element, exact in the sense that no other rounding happens.
transformers 5 writes the same pairs (`<m>.weight_scale_inv`), and for its in-memory fused experts
`experts.gate_up_proj` [E, 2I, H] with `experts.gate_up_proj_scale_inv` [E, ceil(2I/bn), ceil(H/bk)]
(one block grid per expert): every rule below takes leading dims.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from quantfw.errors import CheckpointError

FP8_DTYPES = (torch.float8_e4m3fn,)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


def scale_key(weight_key: str) -> str:
    """`...proj.weight` -> `...proj.weight_scale_inv` (fused `experts.down_proj` -> `..._scale_inv`)."""
    return weight_key + SCALE_SUFFIX


def is_scale_key(key: str) -> bool:
    return key.endswith(SCALE_SUFFIX)


def weight_of(scale_key_: str) -> str:
    return scale_key_[: -len(SCALE_SUFFIX)]


def block_size(config: Mapping[str, Any], where: str) -> tuple[int, int]:
    """The weight block of an FP8 release from its config.json (128 x 128 when not stated)."""
    qc = config.get("quantization_config")
    if not isinstance(qc, Mapping) or qc.get("quant_method") != "fp8":
        return DEFAULT_BLOCK
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"{where}: quantization_config.fmt={fmt!r} (readable: e4m3, float8_e4m3fn)")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointError(
            f"{where}: quantization_config.activation_scheme={qc.get('activation_scheme')!r} "
            "(readable: dynamic; static FP8 activation scales have no meaning after re-quantization)"
        )
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


def scale_shape(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """[..., ceil(N/bn), ceil(K/bk)] of a weight [..., N, K]."""
    *lead, n, k = weight_shape
    return (*lead, math.ceil(n / block[0]), math.ceil(k / block[1]))


def _implied(size: int, blocks: int) -> int | None:
    """The power-of-two block edge (16..4096) that cuts `size` into `blocks` blocks, if any."""
    return next((b for b in (2**i for i in range(4, 13)) if math.ceil(size / b) == blocks), None)


def check_scale(
    weight_shape: tuple[int, ...], scale_shape_: tuple[int, ...], block: tuple[int, int], where: str
) -> None:
    """A one-line error naming the tensor when a scale_inv does not tile its weight with `block`."""
    if len(weight_shape) not in (2, 3):
        raise CheckpointError(
            f"{where}: FP8 weight has shape {list(weight_shape)}, expected [N, K] (or fused experts [E, N, K])"
        )
    want = scale_shape(weight_shape, block)
    got = tuple(scale_shape_)
    if got == want:
        return
    if len(got) == len(want) and got[:-2] == want[:-2]:
        implied = (_implied(weight_shape[-2], got[-2]), _implied(weight_shape[-1], got[-1]))
        if None not in implied and implied != tuple(block):
            raise CheckpointError(
                f"{where}: {SCALE_SUFFIX} {list(got)} implies {implied[0]}x{implied[1]} blocks for weight "
                f"{list(weight_shape)}, but config.json weight_block_size is {list(block)}"
            )
    raise CheckpointError(
        f"{where}: {SCALE_SUFFIX} has shape {list(got)}, expected {list(want)} "
        f"for weight {list(weight_shape)} in {block[0]}x{block[1]} blocks (config weight_block_size)"
    )


def dequantize(
    w: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    where: str = "fp8 weight",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 [..., N, K] = fp8 weight x its block's scale_inv (one fp32 multiply per element), into
    `out` when given (an fp32 tensor of w's shape, e.g. a slot of an expert block: no fresh copy)."""
    from quantfw.quantize.fused import dequantize_fp8_into

    check_scale(tuple(w.shape), tuple(scale_inv.shape), block, where)
    if out is not None and (out.dtype != torch.float32 or tuple(out.shape) != tuple(w.shape)):
        raise ValueError(f"{where}: out must be float32 {list(w.shape)}, got {out.dtype} {list(out.shape)}")
    if out is None:
        out = torch.empty(w.shape, dtype=torch.float32)
    if dequantize_fp8_into(w, scale_inv, block, out):
        return out
    n, k = w.shape[-2:]
    bn, bk = block
    out.copy_(w)
    # bf16 / fp16 scales widen to fp32 exactly; the product below is the only rounding.
    s = scale_inv.to(torch.float32).repeat_interleave(bn, dim=-2)[..., :n, :]  # [..., N, ceil(K/bk)]
    full = k // bk
    if full:
        out[..., : full * bk].unflatten(-1, (full, bk)).mul_(s[..., :full, None])
    if k % bk:
        out[..., full * bk :].mul_(s[..., full : full + 1])
    return out


def quantize_block(
    w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [..., N, K], fp32 scale_inv [..., ceil(N/bn), ceil(K/bk)]) of a float weight.

    As DeepSeek's block weight quantizer: scale_inv = amax(|w| over the block) / 448 and
    q = fp8(w / scale_inv), both in fp32 (round to nearest even; clamped to +-448 against the
    last-ulp overshoot of the division). An all-zero block gets scale_inv 1 (DeepSeek's kernel
    would divide 0 by 0). Partial edge blocks take the amax of the elements they hold."""
    *lead, n, k = w.shape
    bn, bk = block
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    w32 = w.to(torch.float32)
    # zero padding leaves every block's amax unchanged
    padded = torch.nn.functional.pad(w32.abs(), (0, kb * bk - k, 0, nb * bn - n))
    amax = padded.unflatten(-1, (kb, bk)).unflatten(-3, (nb, bn)).amax(dim=(-3, -1))  # [..., nb, kb]
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    s = scale_inv.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    q = (w32 / s).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale_inv


@dataclass(frozen=True)
class BlockScales:
    """The scale_inv of one FP8 weight and its block: what dequantization needs besides the weight."""

    scale_inv: torch.Tensor
    block: tuple[int, int]


def block_scales(reader, key: str, block: tuple[int, int] | None = None) -> BlockScales:
    """The checked scale_inv of the FP8 weight `key` (read from whichever shard holds it)."""
    info = reader.info(key)
    where = f"{reader.folder / info.shard}: tensor '{key}'"
    skey = scale_key(key)
    if skey not in reader:
        raise CheckpointError(f"{where}: FP8 weight without its {skey.rsplit('.', 1)[-1]} tensor")
    block = block or block_size(reader.config(), str(reader.folder / "config.json"))
    check_scale(info.shape, reader.info(skey).shape, block, where)
    return BlockScales(reader.get(skey), block)


def float_of(
    reader, key: str, t: torch.Tensor, block: tuple[int, int] | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`t` (the stored tensor `key`) as float: an FP8 weight dequantized with its checked scale_inv
    (read from whichever shard holds it) into `out` if given, anything else unchanged (copied into
    `out` if given). `reader` is a CheckpointReader."""
    if t.dtype not in FP8_DTYPES:
        return t if out is None else out.copy_(t)
    scales = block_scales(reader, key, block)
    return dequantize(
        t, scales.scale_inv, scales.block, f"{reader.folder / reader.info(key).shard}: tensor '{key}'", out
    )


def read_float(
    reader, key: str, block: tuple[int, int] | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """One tensor of a checkpoint as float: FP8 weights dequantized with their scale_inv (fp32),
    anything else as stored; written into `out` (fp32, the tensor's shape) when given. `reader` is
    a quantfw.io.reader.CheckpointReader."""
    return float_of(reader, key, reader.get(key), block, out)
