"""The built-in post-load transforms (spec sections 2-4). Each declares its output from declared
inputs and the layout dims; none reads dims from the tensor it transforms."""

from __future__ import annotations

import torch

from quantfw import ops
from quantfw.errors import ConfigError, LayoutError
from quantfw.transforms.registry import register, role_dtype


def _swap(shape, dims):
    a, b = dims
    s = list(shape)
    s[a], s[b] = s[b], s[a]
    return tuple(s)


@register("transpose", args=("dims",), rule=lambda d, a, env: (_swap(d[0][0], a["dims"]), d[0][1]))
def transpose(xs, args, env):
    """Swap two dims and make the result contiguous (e.g. [E, N, K] -> [E, K, N] for the GMM)."""
    a, b = args["dims"]
    return xs[0].transpose(a, b).contiguous()


def _squeeze_rule(d, a, env):
    shape, dtype = d[0]
    dim = a["dim"] % len(shape)
    if shape[dim] != 1:
        raise LayoutError(f"squeeze: dim {a['dim']} of declared shape {list(shape)} is not 1")
    return shape[:dim] + shape[dim + 1 :], dtype


@register("squeeze", args=("dim",), rule=_squeeze_rule)
def squeeze(xs, args, env):
    """Drop a size-1 dim ([E, N, 1] per-channel scales -> [E, N])."""
    return xs[0].squeeze(args["dim"])


def _view_int32_rule(d, a, env):
    shape, dtype = d[0]
    if dtype != torch.int8 or shape[-1] % 4:
        raise LayoutError(
            f"view_int32: needs int8 with a last dim divisible by 4, declared {list(shape)} {dtype}"
        )
    return shape[:-1] + (shape[-1] // 4,), torch.int32


@register("view_int32", rule=_view_int32_rule)
def view_int32(xs, args, env):
    """View packed int4 bytes [.., K, N/2] as int32 words [.., K, N/8] (8 nibbles per word)."""
    return ops.int4_weight_to_int32(xs[0].contiguous())


def _encode_rule(d, a, env):
    shape, dtype = d[0]
    if dtype != torch.float32:
        raise LayoutError(f"encode_u64: needs float32 scales, declared {dtype}")
    return shape, torch.int64


@register("encode_u64", rule=_encode_rule)
def encode_u64(xs, args, env):
    """fp32 scales -> UINT64 words holding the fp32 bits in the low half (spec 1.5)."""
    return ops.encode_scale_u64(xs[0])


@register(
    "cast", args=("dtype",), rule=lambda d, a, env: (d[0][0], role_dtype(a["dtype"], env, "cast.dtype"))
)
def cast(xs, args, env):
    """Change dtype (e.g. the W8A8 w2 scale to bf16 before the second GMM)."""
    return xs[0].to(role_dtype(args["dtype"], env, "cast.dtype"))


@register("sum_last", rule=lambda d, a, env: (d[0][0][:-1], torch.float32))
def sum_last(xs, args, env):
    """Sum the last dim in fp32 (msModelSlim's 16 scale_bias partials of a K slice -> one bias)."""
    return xs[0].float().sum(-1)


def _fuse_rule(d, a, env):
    (s1_shape, _), (s2_shape, _) = d
    gs = env.get("group_size") or 0
    if not gs:
        raise ConfigError("fuse_scales_fp16 needs group_size > 0 (declare it with when: group_size)")
    E, N, K = env["E"], env["N"], env["K"]
    # The dims come from the layout, so the step cannot pick up a transposed weight's axes.
    want1, want2 = (E, N, 1), (E, N, K // gs)
    if s1_shape != want1 or s2_shape != want2:
        raise LayoutError(
            f"fuse_scales_fp16: expected scale {list(want1)} and second {list(want2)}, "
            f"declared {list(s1_shape)} and {list(s2_shape)}"
        )
    return (E, K // gs, N), torch.float32


@register("fuse_scales_fp16", rule=_fuse_rule, many_inputs=True)
def fuse_scales_fp16(xs, args, env):
    """Per-channel x per-group scales -> fp32(fp16(s1*s2)) laid out [E, K/G, N] (spec 3 step 2)."""
    s1, s2 = xs
    return (s1.float() * s2.float()).to(torch.float16).float().transpose(1, 2).contiguous()


@register("rename", rule=lambda d, a, env: d[0])
def rename(xs, args, env):
    """Give a tensor its runtime name (`out:`)."""
    return xs[0]


@register("drop", rule=lambda d, a, env: None)
def drop(xs, args, env):
    """Remove on-disk-only tensors (offsets, *_second after fusion)."""
    return None
