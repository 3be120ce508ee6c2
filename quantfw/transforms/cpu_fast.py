"""Post-load transforms of the fast torch CPU backend (`backend.mode=fast`).

They turn the scheme's runtime layout into what torch's weight-packed CPU kernels consume, once,
at load time. Names stay the same (`w13_weight`, `w13_scale`, `w13_bias`), only the layout
changes, so the compute plan is untouched; the fast ops in `quantfw.backends.torch_fast` read it.

- A8W4: weight int32 [E, K, N/8] -> torch int4pack uint8 [E, N, K/2] (nibbles q + 8);
  scale u64 [E, K/G, N] -> bf16 scales_and_zeros [E, P, K/kg, N, 2] (kg: a kernel group size
  dividing the weight group, the per-channel scale replicated over K/kg groups; zeros 0; P = 2
  splits per-group scales into bf16 hi + lo parts);
  bias -> the residual bias - 8 * sum_k q * S, so the kernel (which sees x, not x - 8) gives
  per_token_scale * (sum_k x q S + residual) = the exact op's (sum_k (x - 8) q S + bias) * pts.
- A8W8: weight [E, K, N] -> [E, N, K] (the plain `transpose` op), which torch._int_mm reads as
  a transposed view with no copy.
"""

from __future__ import annotations

import torch

from quantfw import ops
from quantfw.errors import LayoutError
from quantfw.transforms.registry import register

# Group sizes torch 2.13's _weight_int4pack_mm_for_cpu accepts (checked by experiment).
INT4PACK_GROUP_SIZES = (256, 128, 64, 32)


def int4pack_group_size(K: int, n_groups: int, where: str = "int4pack") -> int:
    """Largest kernel group size dividing the weight's group size K / n_groups (K for per-channel)."""
    if n_groups <= 0 or K % n_groups:
        raise LayoutError(f"{where}: {n_groups} scale groups do not divide K = {K}")
    group = K // n_groups
    for kg in INT4PACK_GROUP_SIZES:
        if group % kg == 0:
            return kg
    raise LayoutError(
        f"{where}: weight group {group} (K = {K}) is not a multiple of any int4pack group size "
        f"{list(INT4PACK_GROUP_SIZES)}; use backend.mode=exact"
    )


def _unsigned_nibbles(w32: torch.Tensor) -> torch.Tensor:
    """int32 [K, N/8] (nibble i of word c = column 8c+i) -> uint8 [K, N] holding q + 8 (0..15)."""
    b = w32.contiguous().view(torch.uint8)  # [K, N/2], little-endian: byte j = columns 2j, 2j+1
    lo, hi = (b & 0x0F) ^ 0x08, (b >> 4) ^ 0x08  # two's-complement nibble n -> n + 8 is n ^ 8
    return torch.stack((lo, hi), -1).reshape(b.shape[0], b.shape[1] * 2)


def _int4pack_rule(d, a, env):
    (shape, dtype) = d[0]
    if dtype != torch.int32 or len(shape) != 3:
        raise LayoutError(f"int4pack: needs int32 [E, K, N/8], declared {list(shape)} {dtype}")
    E, K, n8 = shape
    if K % 2:
        raise LayoutError(f"int4pack: K = {K} must be even")
    return (E, n8 * 8, K // 2), torch.uint8


@register("int4pack", rule=_int4pack_rule)
def int4pack(xs, args, env):
    """int32 [E, K, N/8] int4 words -> torch's CPU int4pack layout uint8 [E, N, K/2], per expert."""
    w = xs[0]
    return (
        torch.stack(
            [
                torch._convert_weight_to_int4pack_for_cpu(
                    _unsigned_nibbles(w[e]).T.contiguous().to(torch.int32), 2
                )
                for e in range(w.shape[0])
            ]
        )
        if w.shape[0]
        else torch.empty((0, w.shape[2] * 8, w.shape[1] // 2), dtype=torch.uint8)
    )


def _split_parts(n_groups: int) -> int:
    """1 bf16 scale part for one K group; 2 (hi, lo) when partial sums of several groups can cancel."""
    return 1 if n_groups == 1 else 2


def _sz_rule(d, a, env):
    (shape, dtype) = d[0]
    if dtype != torch.int64 or len(shape) != 3:
        raise LayoutError(f"int4pack_scales: needs u64 (int64) [E, K/G, N], declared {list(shape)} {dtype}")
    E, n_groups, N = shape
    K = env["K"]  # from the layout, never from the tensor
    kg = int4pack_group_size(K, n_groups, "int4pack_scales")
    return (E, _split_parts(n_groups), K // kg, N, 2), torch.bfloat16


@register("int4pack_scales", rule=_sz_rule)
def int4pack_scales(xs, args, env):
    """u64 scales [E, K/G, N] -> bf16 scales_and_zeros [E, P, K/kg, N, 2] (zeros 0, replicated per kg).

    A bf16 scale is off by up to 2^-9 of itself; with one K group that is a 2^-9 relative output
    error, but per-group partial sums can cancel, so several groups also get the remainder
    S - bf16(S) as a second part (P = 2), applied by a second kernel call.
    """
    s = ops.decode_scale_u64(xs[0])
    K = env["K"]
    kg = int4pack_group_size(K, s.shape[1], "int4pack_scales")
    parts = [s.to(torch.bfloat16)]
    if _split_parts(s.shape[1]) == 2:
        parts.append((s - parts[0].float()).to(torch.bfloat16))
    s = torch.stack(parts, 1).repeat_interleave((K // s.shape[1]) // kg, dim=2)
    return torch.stack((s, torch.zeros_like(s)), -1).contiguous()


def _residual_rule(d, a, env):
    (b_shape, b_dtype), (w_shape, w_dtype), (s_shape, s_dtype) = d
    E, N, K = env["E"], env["N"], env["K"]
    want = {"bias": ((E, N), torch.float32), "weight": ((E, K, N // 8), torch.int32)}
    found = {"bias": (b_shape, b_dtype), "weight": (w_shape, w_dtype)}
    for name, w in want.items():
        if found[name] != w:
            raise LayoutError(f"a8w4_residual: {name} declared {found[name]}, expected {w}")
    if s_dtype != torch.int64 or s_shape[0] != E or s_shape[2] != N:
        raise LayoutError(
            f"a8w4_residual: scale declared {list(s_shape)} {s_dtype}, expected [E, K/G, N] u64"
        )
    return (E, N), torch.float32


@register("a8w4_residual", rule=_residual_rule, many_inputs=True, consumes=False)
def a8w4_residual(xs, args, env):
    """bias [E, N] -> bias - 8 * sum_k q * S (fp32): what is left once the kernel sees x, not x - 8."""
    bias, w, s = xs
    S = ops.decode_scale_u64(s)  # [E, K/G, N]
    out = bias.clone()
    for e in range(w.shape[0]):  # one expert at a time keeps the unpacked int8 copy small
        q = ops.unpack_int4_int32(w[e]).float()  # [K, N]
        sums = q.reshape(S.shape[1], -1, q.shape[-1]).sum(1)  # per weight group [K/G, N]
        out[e] -= 8.0 * (sums * S[e]).sum(0)
    return out
