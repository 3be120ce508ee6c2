"""CPU reference of the Ascend NPU operators used by the MoE schemes (spec sections 1 and 7).

Conventions: G = number of groups (experts); group lists are per-expert counts (int64 [G]); rows of
x are grouped consecutively by expert; rows past sum(counts) are ignored (zeros / scale 1 in the
output). activate_left=True is the default (gate = first half). Bad shapes or dtypes raise
`quantfw.errors.LayoutError` naming the op and argument.
"""

import quantfw.vml_init  # noqa: F401  (before any op runs)
from quantfw.ops._checks import check_tensor, fail, row_groups
from quantfw.ops.activation import dequant_swiglu_quant, dynamic_quant, swiglu, swiglu_clip_quant
from quantfw.ops.gmm import grouped_matmul_a8w4, grouped_matmul_a8w8
from quantfw.ops.int4 import (
    decode_scale_u64,
    encode_scale_u64,
    int4_weight_to_int32,
    pack_int4,
    unpack_int4,
    unpack_int4_int32,
)

__all__ = [
    "check_tensor",
    "fail",
    "row_groups",
    "decode_scale_u64",
    "dequant_swiglu_quant",
    "dynamic_quant",
    "encode_scale_u64",
    "grouped_matmul_a8w4",
    "grouped_matmul_a8w8",
    "int4_weight_to_int32",
    "pack_int4",
    "swiglu",
    "swiglu_clip_quant",
    "unpack_int4",
    "unpack_int4_int32",
]
