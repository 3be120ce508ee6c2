"""Load transforms for compressed-tensors "pack-quantized" int4 (llm-compressor), spec 1.6 / 9.

That format packs 8 values per int32 along K (nibble i of word c = column 8c+i) with an offset of
8 (unsigned nibbles), and has no A8W4 bias. These ops turn it into the W4A8 runtime layout with
the same built-in steps as the other formats (pack along N, transpose, int32 view, u64 scale).
"""

from __future__ import annotations

import torch

from quantfw import ops
from quantfw.errors import LayoutError
from quantfw.transforms.registry import register

# XOR with 0x8 per nibble turns an offset-8 nibble (q + 8) into the two's-complement nibble of q.
_OFFSET8 = torch.tensor(0x88888888, dtype=torch.int64).to(torch.int32).item()


def _unpack_rule(d, a, env):
    shape, dtype = d[0]
    if dtype != torch.int32 or shape[-1] * 8 != env["K"]:
        raise LayoutError(
            f"unpack_int4_k: needs int32 [.., K/8] with K = {env['K']} from the layout, declared {list(shape)} {dtype}"
        )
    if a.get("offset", 0) not in (0, 8):
        raise LayoutError(f"unpack_int4_k: offset must be 0 or 8, got {a.get('offset')}")
    return shape[:-1] + (env["K"],), torch.int8


@register("unpack_int4_k", args=("offset",), rule=_unpack_rule)
def unpack_int4_k(xs, args, env):
    """int32 [.., N, K/8] with 8 int4 values per word along K -> int8 [.., N, K] in -8..7.

    offset 8: nibbles hold q + 8 (compressed-tensors); offset 0: two's-complement nibbles."""
    w = xs[0]
    if args.get("offset", 0) == 8:
        w = w ^ _OFFSET8
    return ops.unpack_int4_int32(w)


def _pack_rule(d, a, env):
    shape, dtype = d[0]
    if dtype != torch.int8 or shape[-2] % 2:
        raise LayoutError(f"pack_int4_n: needs int8 [.., N, K] with even N, declared {list(shape)} {dtype}")
    return shape[:-2] + (shape[-2] // 2, shape[-1]), torch.int8


@register("pack_int4_n", rule=_pack_rule)
def pack_int4_n(xs, args, env):
    """int8 [.., N, K] int4 values -> the msModelSlim on-disk packing along N, int8 [.., N/2, K]."""
    return ops.pack_int4(xs[0])


def _bias_rule(d, a, env):
    (q_shape, q_dtype), (s_shape, s_dtype) = d
    E, N, K = env["E"], env["N"], env["K"]
    gs = env.get("group_size") or 0
    want_s = (E, N, K // gs if gs else 1)
    if (q_shape, q_dtype) != ((E, N, K), torch.int8) or (s_shape, s_dtype) != (want_s, torch.float32):
        raise LayoutError(
            f"a8w4_bias_from_q: expected q {[E, N, K]} int8 and scale {list(want_s)} float32, "
            f"declared {list(q_shape)} {q_dtype} and {list(s_shape)} {s_dtype}"
        )
    return (E, N), torch.float32


@register("a8w4_bias_from_q", rule=_bias_rule, many_inputs=True, consumes=False)
def a8w4_bias_from_q(xs, args, env):
    """The A8W4 bias [E, N] = 8 * sum_k q[k] * S[g(k)] for formats that do not store it.

    Integer group sums first (exact), then one fp32 product per group: the kernel's -8 shift
    of the activations is cancelled as exactly as fp32 allows."""
    q, s = xs
    E, N, K = q.shape
    groups = s.shape[-1]
    qsum = q.reshape(E, N, groups, K // groups).sum(-1, dtype=torch.int32).to(torch.float32)
    return 8 * (qsum * s).sum(-1)
