"""`backend=npu_sim`: a CPU stand-in for the torch_npu module, injected as the "npu namespace" into
the same orchestration code as `backend=npu` (quantfw/backends/npu.py).

Each operator has torch_npu 2.13.0's name, signature and defaults (read from the wheel's
`torch_npu/_op_plugin_docs.py`; see docs/npu.md), validates its arguments against the documented
constraints (plus the A8W4 ones of the spec, section 1.5), and computes with `quantfw.ops`. A call
the device would reject raises `LayoutError` naming the op and argument; a legal call outside what
the simulator emulates (e.g. smooth scales, static quant) raises too, saying "not emulated", so a
test never passes on a path nobody checked. Outputs the docs call undefined (rows past the group
sum) are NaN/garbage-marked here so a caller that reads them fails loudly.
"""

from __future__ import annotations

from typing import Any

import torch

from quantfw import ops
from quantfw.errors import LayoutError
from quantfw.ops import check_tensor
from quantfw.ops.rowmax import rows_local

ACL_FORMAT_ND = 2
ACL_FORMAT_FRACTAL_NZ = 29
ACL_FORMATS = {0: "NCHW", 1: "NHWC", 2: "ND", 3: "NC1HWC0", 4: "FRACTAL_Z", 29: "FRACTAL_NZ"}
INNER_LIMIT = 65536  # npu_grouped_matmul: last dim of x and of each weight < 65536
MAX_GROUPS = 1024  # npu_grouped_matmul single 3-D weight: group_list length <= 1024
A8W4_MAX_K = 18432  # spec 1.5
A8W4_GROUP_SIZE = 256  # spec 9: the NPU A8W4 kernel supports per-group 256 (or per-channel) only
DSQ_MAX_I = 10496  # npu_dequant_swiglu_quant with group_index: H (= I) <= 10496 and 64-aligned
INIT_ROUTING_MAX_EXPERTS = 10240
UNPERMUTE_MAX_TOPK = 512
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
HALF = (torch.float16, torch.bfloat16)

_FORMATS: dict[int, int] = {}  # storage address -> acl format (the format belongs to the storage)


def _err(op: str, arg: str, expected: str, found: Any) -> LayoutError:
    return LayoutError(f"torch_npu.{op}: argument '{arg}' expected {expected}, found {found}")


def _t(op: str, arg: str, t: Any, dtypes=None, shape=None, ndim=None) -> torch.Tensor:
    """quantfw.ops' tensor check, with the message naming the torch_npu op."""
    try:
        return check_tensor(op, arg, t, dtypes, shape=shape, ndim=ndim)
    except LayoutError as e:
        raise LayoutError(f"torch_npu.{e}") from None


def _none(op: str, **args: Any) -> None:
    for name, val in args.items():
        if val is not None:
            raise _err(
                op, name, "None (the only value torch_npu accepts here or npu_sim emulates)", "a value"
            )


def _single(op: str, arg: str, val: Any, required: bool) -> torch.Tensor | None:
    """npu_grouped_matmul list arguments: a list holding exactly one tensor (single-tensor mode)."""
    if val is None:
        if required:
            raise _err(op, arg, "a list with one tensor (required here)", None)
        return None
    if not isinstance(val, (list, tuple)) or len(val) != 1:
        found = f"list of {len(val)}" if isinstance(val, (list, tuple)) else type(val).__name__
        raise _err(op, arg, "a list with one tensor (group_type=0, single x/weight/y)", found)
    return val[0]


def group_counts(op: str, arg: str, group_list: Any, group_list_type: int, groups: int, rows: int):
    """Validate a group list as torch_npu reads it and return per-group counts (int64 [groups])."""
    gl = _t(op, arg, group_list, (torch.int64,), ndim=1)
    if gl.shape[0] != groups:
        raise _err(op, arg, f"length {groups} (one entry per expert of weight)", gl.shape[0])
    if groups > MAX_GROUPS:
        raise _err(op, arg, f"at most {MAX_GROUPS} groups", groups)
    if group_list_type == 0:  # cumsum: non-decreasing, last value == rows
        if gl.numel() and (bool((gl < 0).any()) or bool((gl[1:] < gl[:-1]).any())):
            raise _err(op, arg, "a non-negative non-decreasing cumsum (group_list_type=0)", gl.tolist())
        last = int(gl[-1]) if gl.numel() else 0
        if last != rows:
            raise _err(op, arg, f"last cumsum value == x rows {rows} (group_list_type=0)", last)
        return torch.diff(gl, prepend=gl.new_zeros(1))
    if group_list_type == 1:  # counts: non-negative, sum == rows
        if gl.numel() and bool((gl < 0).any()):
            raise _err(op, arg, "non-negative counts (group_list_type=1)", gl.tolist())
        if int(gl.sum()) != rows:
            raise _err(
                op, arg, f"counts summing to x rows {rows} (group_list_type=1)", f"sum {int(gl.sum())}"
            )
        return gl
    raise _err(op, "group_list_type", "0 (cumsum) or 1 (counts)", group_list_type)


class NpuSim:
    """The simulated torch_npu namespace. `calls` records every operator called, in order."""

    def __init__(self, has_swiglu_clip_quant: bool = False):
        self.calls: list[str] = []
        if has_swiglu_clip_quant:  # the cann-recipes custom op; torch_npu 2.13.0 does not ship it
            self.npu_swiglu_clip_quant = self._swiglu_clip_quant

    def _call(self, op: str) -> str:
        self.calls.append(op)
        return op

    # -- activations -------------------------------------------------------------------------
    def npu_dynamic_quant(self, x, *, smooth_scales=None, group_index=None, dst_type=None):
        op = self._call("npu_dynamic_quant")
        _t(op, "x", x, HALF)
        if x.dim() < 2:
            raise _err(op, "x", "more than 1 dim", list(x.shape))
        _none(op, smooth_scales=smooth_scales, group_index=group_index)
        if dst_type not in (None, torch.int8):
            raise _err(op, "dst_type", "None or torch.int8 (quint4x2 not emulated)", dst_type)
        with rows_local():  # the kernel's bound is its own slice's amax, even under TP
            return ops.dynamic_quant(x)

    def npu_swiglu(self, x, dim=-1):
        op = self._call("npu_swiglu")
        _t(op, "x", x, FLOATS)
        if not 1 <= x.dim() <= 8:
            raise _err(op, "x", "1 to 8 dims", x.dim())
        if dim not in (-1, x.dim() - 1):
            raise _err(op, "dim", "-1 (the last dim; others not emulated)", dim)
        if x.shape[-1] % 2:
            raise _err(op, "x", "an even size along dim", list(x.shape))
        return ops.swiglu(x, activate_left=True)  # swish(first half) * second half

    def npu_dequant_swiglu_quant(
        self,
        x,
        *,
        weight_scale=None,
        activation_scale=None,
        bias=None,
        quant_scale=None,
        quant_offset=None,
        group_index=None,
        activate_left=False,
        quant_mode=0,
        swiglu_mode=0,
        clamp_limit=7.0,
        glu_alpha=1.702,
        glu_bias=1.0,
    ):
        op = self._call("npu_dequant_swiglu_quant")
        _t(op, "x", x, (torch.int32,), ndim=2)  # bf16 x (no dequant) is not emulated
        rows, width = x.shape
        if width % 2:
            raise _err(op, "x", "an even last dim 2H", list(x.shape))
        if group_index is None:
            raise _err(
                op, "group_index", "int64 per-group counts (the non-grouped mode is not emulated)", None
            )
        gi = _t(op, "group_index", group_index, (torch.int64,), ndim=1)
        groups = gi.shape[0]
        if weight_scale is None or activation_scale is None:
            raise _err(op, "weight_scale/activation_scale", "tensors (required when x is int32)", None)
        _t(op, "weight_scale", weight_scale, (torch.float32,), shape=(groups, width))
        act = _t(op, "activation_scale", activation_scale, (torch.float32,))
        if tuple(act.shape) not in ((rows,), (rows, 1)):
            raise _err(op, "activation_scale", f"shape [{rows}] or [{rows}, 1]", list(act.shape))
        _none(op, bias=bias, quant_offset=quant_offset, quant_scale=quant_scale)
        if quant_mode != 1:
            raise _err(op, "quant_mode", "1 (dynamic; required with group_index)", quant_mode)
        if swiglu_mode != 0:
            raise _err(
                op, "swiglu_mode", "0 (plain swiglu; the clamped variant is not emulated)", swiglu_mode
            )
        half = width // 2
        if half > DSQ_MAX_I or half % 64:
            raise _err(op, "x", f"H = 2H/2 <= {DSQ_MAX_I} and 64-aligned (grouped mode)", f"H = {half}")
        if gi.numel() and bool((gi < 0).any()) or int(gi.sum()) > rows:
            raise _err(op, "group_index", f"non-negative counts summing to <= {rows}", gi.tolist())
        with rows_local():
            q, s = ops.dequant_swiglu_quant(
                x, weight_scale, act.reshape(rows), gi, activate_left=activate_left
            )
        s[int(gi.sum()) :] = float("nan")  # undefined on the device: make any use visible
        return q, s

    def _swiglu_clip_quant(self, x, group_index, group_alpha, activate_left=True):
        """cann-recipes `npu_swiglu_clip_quant` (spec 1.4); argument names unverified."""
        op = self._call("npu_swiglu_clip_quant")
        _t(op, "x", x, (torch.bfloat16, torch.float16, torch.float32), ndim=2)
        _t(op, "group_alpha", group_alpha, (torch.float32,), ndim=1)
        _t(op, "group_index", group_index, (torch.int64,), shape=(group_alpha.shape[0],))
        with rows_local():
            return ops.swiglu_clip_quant(x, group_index, group_alpha, activate_left=activate_left)

    # -- grouped matmul ----------------------------------------------------------------------
    def npu_grouped_matmul(
        self,
        x,
        weight,
        *,
        bias=None,
        scale=None,
        offset=None,
        antiquant_scale=None,
        antiquant_offset=None,
        per_token_scale=None,
        group_list=None,
        activation_input=None,
        activation_quant_scale=None,
        activation_quant_offset=None,
        split_item=0,
        group_type=None,
        group_list_type=0,
        act_type=0,
        output_dtype=None,
        tuning_config=None,
    ):
        op = self._call("npu_grouped_matmul")
        _none(
            op,
            offset=offset,
            antiquant_scale=antiquant_scale,
            antiquant_offset=antiquant_offset,
            activation_input=activation_input,
            activation_quant_scale=activation_quant_scale,
            activation_quant_offset=activation_quant_offset,
        )
        if group_type != 0:
            raise _err(op, "group_type", "0 (group along M; the MoE mode emulated)", group_type)
        if split_item not in (2, 3):
            raise _err(op, "split_item", "2 or 3 (single output tensor with group_type=0)", split_item)
        if act_type != 0:
            raise _err(op, "act_type", "0 (no fused activation)", act_type)
        xt = _t(op, "x[0]", _single(op, "x", x, True), (torch.int8,), ndim=2)  # float GMM not emulated
        w = _t(op, "weight[0]", _single(op, "weight", weight, True), (torch.int8, torch.int32), ndim=3)
        rows, k = xt.shape
        groups = w.shape[0]
        if w.shape[1] != k:
            raise _err(op, "weight[0]", f"[E, K={k}, *] matching x's K", list(w.shape))
        if k >= INNER_LIMIT or w.shape[2] >= INNER_LIMIT:
            raise _err(op, "x/weight", f"last dims < {INNER_LIMIT} (InnerLimit)", (k, w.shape[2]))
        counts = group_counts(op, "group_list", group_list, group_list_type, groups, rows)
        sc = _single(op, "scale", scale, False)
        pts = _single(op, "per_token_scale", per_token_scale, False)
        b = _single(op, "bias", bias, False)
        if pts is not None:
            _t(op, "per_token_scale[0]", pts, (torch.float32,), shape=(rows,))
        if w.dtype == torch.int8:
            return [self._a8w8(op, xt, w, sc, pts, b, counts, output_dtype)]
        return [self._a8w4(op, xt, w, sc, pts, b, counts, output_dtype)]

    @staticmethod
    def _a8w8(op, x, w, scale, pts, bias, counts, output_dtype):
        groups, _, n = w.shape
        _none(op, bias=bias)  # the A8W8 bias is int32 on the device; not used by quantfw, not emulated
        if scale is None:
            if output_dtype != torch.int32 or pts is not None:
                raise _err(
                    op,
                    "output_dtype",
                    "torch.int32 with no scale/per_token_scale (raw accumulator)",
                    f"{output_dtype}, per_token_scale {'set' if pts is not None else 'None'}",
                )
            return ops.grouped_matmul_a8w8(x, w, None, None, counts)
        _t(op, "scale[0]", scale, (torch.float32, torch.bfloat16), shape=(groups, n))
        if output_dtype not in HALF:
            raise _err(op, "output_dtype", "torch.bfloat16 or torch.float16 (quantized A8W8)", output_dtype)
        return ops.grouped_matmul_a8w8(x, w, scale, pts, counts, output_dtype=output_dtype)

    @staticmethod
    def _a8w4(op, x, w, scale, pts, bias, counts, output_dtype):
        groups, k, n8 = w.shape
        if k > A8W4_MAX_K:
            raise _err(op, "weight[0]", f"K <= {A8W4_MAX_K} (A8W4)", f"K = {k}")
        if scale is None:
            raise _err(op, "scale", "a list with the uint64 [E, K/group_size, N] scale (A8W4)", None)
        _t(op, "scale[0]", scale, (torch.int64,), ndim=3)
        n = scale.shape[2]
        if n % 8:
            raise _err(op, "scale[0]", "N % 8 == 0 (A8W4)", f"N = {n}")
        if tuple(scale.shape) != (groups, scale.shape[1], n) or n != 8 * n8:
            raise _err(op, "scale[0]", f"[{groups}, K/group_size, {8 * n8}]", list(scale.shape))
        kg = scale.shape[1]
        if kg == 0 or k % kg:
            raise _err(op, "scale[0]", f"K/group_size groups with K % group_size == 0 (K = {k})", kg)
        if kg > 1 and k // kg != A8W4_GROUP_SIZE:
            raise _err(op, "scale[0]", f"group size {A8W4_GROUP_SIZE} or per-channel [E, 1, N]", f"{k // kg}")
        if bias is None:
            raise _err(op, "bias", "a list with the fp32 [E, N] bias (required for A8W4: cancels x-8)", None)
        _t(op, "bias[0]", bias, (torch.float32,), shape=(groups, n))
        if pts is None:
            raise _err(op, "per_token_scale", "a list with the fp32 [M] per-token scale (A8W4)", None)
        if output_dtype not in HALF:
            raise _err(op, "output_dtype", "torch.bfloat16 or torch.float16 (A8W4)", output_dtype)
        return ops.grouped_matmul_a8w4(x, w, scale, bias, pts, counts, output_dtype=output_dtype)

    # -- routing -----------------------------------------------------------------------------
    def npu_moe_init_routing_v2(
        self,
        x,
        expert_idx,
        *,
        scale=None,
        offset=None,
        active_num=-1,
        expert_capacity=-1,
        expert_num=-1,
        drop_pad_mode=0,
        expert_tokens_num_type=0,
        expert_tokens_num_flag=False,
        quant_mode=-1,
        active_expert_range=(),
        row_idx_type=0,
    ):
        """Sort (token, k) slots by expert (stable in slot order t*K+k): expanded_x [T*K, H] with the
        in-range rows first, expanded_row_idx[slot] = row or -1 (gather, row_idx_type=0), counts per
        expert of active_expert_range (int64), expanded_scale (undefined without scale)."""
        op = self._call("npu_moe_init_routing_v2")
        _t(op, "x", x, FLOATS, ndim=2)
        ids = _t(op, "expert_idx", expert_idx, (torch.int32,), ndim=2)
        if ids.shape[0] != x.shape[0]:
            raise _err(op, "expert_idx", f"[{x.shape[0]}, K] (one row per token)", list(ids.shape))
        _none(op, scale=scale, offset=offset)
        t, k = ids.shape
        if not 0 < expert_num <= INIT_ROUTING_MAX_EXPERTS:
            raise _err(op, "expert_num", f"in (0, {INIT_ROUTING_MAX_EXPERTS}]", expert_num)
        lo, hi = list(active_expert_range) or [0, expert_num]
        if not 0 <= lo < hi <= expert_num:
            raise _err(
                op, "active_expert_range", f"[start, end) with 0 <= start < end <= {expert_num}", [lo, hi]
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= expert_num):
            raise _err(op, "expert_idx", f"ids in [0, {expert_num})", f"[{int(ids.min())}, {int(ids.max())}]")
        if active_num not in (-1, 0) and active_num < t * k:
            raise _err(op, "active_num", f"-1, 0 or >= T*K = {t * k} (capping not emulated)", active_num)
        if drop_pad_mode != 0:
            raise _err(op, "drop_pad_mode", "0 (dropless)", drop_pad_mode)
        if expert_tokens_num_type != 1 or not expert_tokens_num_flag:
            raise _err(
                op,
                "expert_tokens_num_type",
                "1 (counts) with expert_tokens_num_flag=True",
                f"{expert_tokens_num_type}, flag {expert_tokens_num_flag}",
            )
        if quant_mode != -1:
            raise _err(op, "quant_mode", "-1 (no quant; dynamic quant mode not emulated)", quant_mode)
        if row_idx_type != 0:
            raise _err(op, "row_idx_type", "0 (gather indices; scatter not emulated)", row_idx_type)
        flat = ids.reshape(-1).long()
        slots = torch.nonzero((flat >= lo) & (flat < hi)).squeeze(1)
        order = slots[torch.argsort(flat[slots], stable=True)]
        valid = order.numel()
        expanded_x = torch.full((t * k, x.shape[1]), float("nan"), dtype=x.dtype)  # past valid: undefined
        expanded_x[:valid] = x[order // k]
        row_idx = torch.full((t * k,), -1, dtype=torch.int32)
        row_idx[order] = torch.arange(valid, dtype=torch.int32)
        counts = torch.bincount(flat[order] - lo, minlength=hi - lo).to(torch.int64)
        expanded_scale = torch.full((t * k,), float("nan"), dtype=torch.float32)
        return expanded_x, row_idx, counts, expanded_scale

    def npu_moe_token_unpermute(
        self, permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None
    ):
        """out[t] = sum_j probs[t, j] * permuted_tokens[sorted_indices[t*K + j]] (fp32 sum)."""
        op = self._call("npu_moe_token_unpermute")
        tok = _t(op, "permuted_tokens", permuted_tokens, FLOATS, ndim=2)
        idx = _t(op, "sorted_indices", sorted_indices, (torch.int32,), shape=(tok.shape[0],))
        if padded_mode or restore_shape is not None:
            raise _err(op, "padded_mode", "False with restore_shape None", (padded_mode, restore_shape))
        if probs is None:
            k = 1
        else:
            _t(op, "probs", probs, FLOATS, ndim=2)
            k = probs.shape[1]
            if k > UNPERMUTE_MAX_TOPK or probs.shape[0] * k != tok.shape[0]:
                raise _err(
                    op, "probs", f"[tokens, topK] with tokens*topK = {tok.shape[0]}", list(probs.shape)
                )
        n = tok.shape[0]
        if n and (int(idx.min()) < 0 or int(idx.max()) >= n or torch.unique(idx).numel() != n):
            raise _err(op, "sorted_indices", f"a permutation of [0, {n})", "out of range or repeated indices")
        rows = tok[idx.long()].float()
        if probs is not None:
            rows = rows * probs.reshape(-1, 1).float()
        return rows.reshape(n // k, k, -1).sum(1).to(tok.dtype)

    # -- formats -----------------------------------------------------------------------------
    @staticmethod
    def npu_format_cast(self_tensor: torch.Tensor, acl_format: int) -> torch.Tensor:
        """Identity on CPU (a copy, as on the device) that records the format of its storage."""
        _t("npu_format_cast", "self", self_tensor)
        if acl_format not in ACL_FORMATS:
            raise _err("npu_format_cast", "acl_format", f"one of {sorted(ACL_FORMATS)}", acl_format)
        out = self_tensor.clone()
        _FORMATS[out.untyped_storage().data_ptr()] = int(acl_format)
        return out

    @staticmethod
    def get_npu_format(t: torch.Tensor) -> int:
        return _FORMATS.get(t.untyped_storage().data_ptr(), ACL_FORMAT_ND)
