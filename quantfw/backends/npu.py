"""`backend=npu`: the compute plan on Ascend NPUs through torch_npu (docs/npu.md).

`NpuOps` maps every PLAN op onto torch_npu calls with explicit arguments (torch_npu's defaults differ
from quantfw's: activate_left False, group_list_type 0 = cumsum). It only ever calls the injected
"npu namespace": the real torch_npu module for `backend=npu`, the CPU `NpuSim` for `backend=npu_sim`,
so everything but the device call runs in CI. torch_npu is imported here only, and only when
`backend=npu` is built (importing it without CANN breaks `import torch`).

NPU-only post-load steps are registered transforms (`to_device`, `npu_format_cast`) that
conf/backend/npu*.yaml lists under `post_load`; the layer has no NPU branch.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from quantfw.backends.base import Backend, register_backend
from quantfw.backends.npu_sim import NpuSim
from quantfw.errors import BackendUnavailable, ConfigError
from quantfw.layout.spec import parse_dtype
from quantfw.ops.activation import dequant_swiglu_quant, dynamic_quant, pad_rows, quant_rows
from quantfw.ops.rowmax import is_split, row_amax
from quantfw.schemes.plan_ops import PLAN_OPS
from quantfw.transforms import register

INSTALL_HINT = (
    "install it with pip install 'quantfw[npu]' (torch-npu==2.13.0) on a host with the Ascend CANN "
    "toolkit sourced (set_env.sh) and an NPU device; use backend=npu_sim to run the same code on CPU"
)
CLIP_PATHS = ("auto", "native", "composed")


def load_torch_npu(importer: Callable[[str], Any] = importlib.import_module) -> Any:
    """Import torch_npu and check a device is visible; one-line BackendUnavailable otherwise."""
    try:
        npu = importer("torch_npu")
    except Exception as e:  # ImportError, or CANN libraries missing at import time
        first = (str(e).strip().splitlines() or [""])[0]
        raise BackendUnavailable(
            f"backend=npu: cannot import torch_npu ({type(e).__name__}: {first}); {INSTALL_HINT}"
        ) from None
    available = getattr(getattr(torch, "npu", None), "is_available", None)
    if available is None or not available():
        raise BackendUnavailable(
            f"backend=npu: torch_npu imported but no Ascend NPU device is visible; {INSTALL_HINT}"
        )
    return npu


def _one(t: torch.Tensor | None) -> list[torch.Tensor] | None:
    return None if t is None else [t]


class NpuOps:
    """The plan ops (quantfw.ops signatures) written as torch_npu calls on an npu namespace."""

    def __init__(
        self, npu: Any, notes: dict[str, Any], swiglu_clip: str = "auto", allow_unclipped: bool = False
    ):
        if swiglu_clip not in CLIP_PATHS:
            raise ConfigError(f"backend.swiglu_clip: '{swiglu_clip}' (allowed: {', '.join(CLIP_PATHS)})")
        self.npu, self.notes = npu, notes
        self.swiglu_clip, self.allow_unclipped = swiglu_clip, allow_unclipped

    # -- plan ops ----------------------------------------------------------------------------
    def dynamic_quant(self, x: torch.Tensor):
        if x.dtype == torch.float32:  # npu_dynamic_quant takes fp16/bf16 only
            self.notes["dynamic_quant"] = "float32 input cast to bfloat16 for npu_dynamic_quant"
            x = x.to(torch.bfloat16)
        if is_split():
            return self._split_row("dynamic_quant", dynamic_quant, x)
        q, s = self.npu.npu_dynamic_quant(x)
        return q, s

    def _split_row(self, name, composed, *args):
        """Under TP a row is split over the TP ranks and a fused quant kernel's bound would be its
        slice's amax: the same math from standard torch ops, with the whole row's (`row_amax`)."""
        self.notes[f"{name}_tp"] = "composed from standard ops with the TP group's row max"
        return composed(*args)

    def swiglu(self, x: torch.Tensor):
        return self.npu.npu_swiglu(x, dim=-1)  # swish(first half) * second half: gate first

    def dequant_swiglu_quant(self, x, weight_scale, activation_scale, group_index):
        if is_split():
            return self._split_row(
                "dequant_swiglu_quant", dequant_swiglu_quant, x, weight_scale, activation_scale, group_index
            )
        q, s = self.npu.npu_dequant_swiglu_quant(
            x,
            weight_scale=weight_scale,
            activation_scale=activation_scale,
            bias=None,
            quant_scale=None,
            quant_offset=None,
            group_index=group_index,
            activate_left=True,
            quant_mode=1,
        )
        return q, s

    def _gmm(self, x, weight, group_list, output_dtype, scale=None, bias=None, per_token_scale=None):
        return self.npu.npu_grouped_matmul(
            [x],
            [weight],
            bias=_one(bias),
            scale=_one(scale),
            per_token_scale=_one(per_token_scale),
            group_list=group_list,
            split_item=2,
            group_type=0,
            group_list_type=1,  # counts
            output_dtype=output_dtype,
        )[0]

    def grouped_matmul_a8w8(
        self, x, weight, scale, per_token_scale, group_list, bias=None, output_dtype=torch.bfloat16
    ):
        # scale None: the raw int32 accumulator (vllm-ascend's W8A8 path into npu_dequant_swiglu_quant).
        out_dtype = torch.int32 if scale is None else output_dtype
        return self._gmm(x, weight, group_list, out_dtype, scale, bias, per_token_scale)

    def grouped_matmul_a8w4(
        self, x, weight, scale, bias, per_token_scale, group_list, output_dtype=torch.bfloat16
    ):
        return self._gmm(x, weight, group_list, output_dtype, scale, bias, per_token_scale)

    def swiglu_clip_quant(self, x, group_index, group_alpha):
        native = getattr(self.npu, "npu_swiglu_clip_quant", None)
        if is_split():
            if self.swiglu_clip == "native":
                raise BackendUnavailable(
                    "backend.swiglu_clip=native under tensor parallelism: the fused op bounds each "
                    "rank's slice alone; use backend.swiglu_clip=auto|composed (the TP row max)"
                )
            return self._split_row("swiglu_clip_quant", self._composed_clip, x, group_index, group_alpha)
        if self.swiglu_clip == "composed" or (self.swiglu_clip == "auto" and native is None):
            self.notes["swiglu_clip_quant"] = (
                "composed: npu_swiglu(fp32) + per-row amax x alpha[e] + clamp + int8 quant with s = t/127"
            )
            return self._composed_clip(x, group_index, group_alpha)
        if native is not None:
            self.notes["swiglu_clip_quant"] = "npu_swiglu_clip_quant"
            return native(x, group_index, group_alpha, activate_left=True)
        if not self.allow_unclipped:
            raise BackendUnavailable(
                "backend.swiglu_clip=native: this torch_npu has no npu_swiglu_clip_quant (a cann-recipes "
                "custom op); use backend.swiglu_clip=auto|composed (same clipped math from standard ops) "
                "or backend.allow_unclipped_fallback=true to run W4A8-clip UNCLIPPED"
            )
        if "swiglu_clip_quant" not in self.notes:
            warnings.warn(
                "npu_swiglu_clip_quant missing: running the W4A8-clip down-proj input UNCLIPPED "
                "(backend.allow_unclipped_fallback=true)",
                stacklevel=2,
            )
        self.notes["swiglu_clip_quant"] = "UNCLIPPED fallback: npu_swiglu + npu_dynamic_quant (alpha ignored)"
        return self.dynamic_quant(self.swiglu(x))

    def _composed_clip(self, x, group_index, group_alpha):
        """Spec 1.4 from standard ops: y = swiglu(x) in fp32, t = alpha[e] * rowmax|y|, clamp to
        [-t, t], quantize with s = t / 127. For alpha <= 1 that is exactly dynamic quant of the
        clamped rows (their rowmax is t); written with t so alpha > 1 stays correct too. The row max is
        `row_amax`'s: under TP, the whole row's."""
        y = self.npu.npu_swiglu(x.float(), dim=-1)
        valid = int(group_index.sum())
        experts = torch.arange(group_alpha.shape[0], device=group_alpha.device)
        t = group_alpha[torch.repeat_interleave(experts, group_index)] * row_amax(y[:valid])
        clamped = torch.clamp(y[:valid], -t.unsqueeze(-1), t.unsqueeze(-1))
        q, s = quant_rows(clamped, t)
        return pad_rows(q, s, x.shape[0])

    # -- routing hooks (Backend.route / Backend.combine) -------------------------------------
    def route(self, hidden_states, topk_ids, expert_offset: int, E: int):
        """npu_moe_init_routing_v2: rows sorted by expert, counts of [offset, offset+E)."""
        T, k = topk_ids.shape
        top = int(topk_ids.max()) + 1 if topk_ids.numel() else 0
        expanded_x, row_idx, counts, _ = self.npu.npu_moe_init_routing_v2(
            hidden_states,
            topk_ids.to(torch.int32),
            active_num=T * k,
            expert_capacity=-1,
            expert_num=max(expert_offset + E, top),  # global ids of other EP ranks must be < expert_num
            drop_pad_mode=0,
            expert_tokens_num_type=1,
            expert_tokens_num_flag=True,
            quant_mode=-1,
            active_expert_range=[expert_offset, expert_offset + E],
            row_idx_type=0,
        )
        valid = int(counts.sum())
        return expanded_x[:valid], counts, (row_idx, valid)

    def combine(self, out, topk_weights, ctx, hidden_states):
        """npu_moe_token_unpermute: out rows back to tokens, weighted by topk_weights, fp32 sum.
        Slots of other EP ranks (-1) point at zero padding rows, one each, so indices stay a permutation."""
        row_idx, valid = ctx
        T, k = topk_weights.shape
        padded = torch.zeros((T * k, out.shape[1]), dtype=torch.float32, device=out.device)
        padded[:valid] = out.float()
        idx = row_idx.clone()
        missing = idx < 0
        idx[missing] = torch.arange(valid, T * k, dtype=torch.int32, device=idx.device)
        res = self.npu.npu_moe_token_unpermute(padded, idx, probs=topk_weights.float())
        return res.to(hidden_states.dtype)


def build_npu_backend(name: str, npu: Any, cfg: Mapping[str, Any]) -> Backend:
    """The Backend over an npu namespace (torch_npu or NpuSim): same code for device and CI."""
    notes: dict[str, Any] = {"npu_namespace": type(npu).__name__ if name == "npu_sim" else "torch_npu"}
    impl = NpuOps(
        npu,
        notes,
        swiglu_clip=str(cfg.get("swiglu_clip", "auto")),
        allow_unclipped=bool(cfg.get("allow_unclipped_fallback", False)),
    )
    ops = {op: getattr(impl, op) for op in PLAN_OPS if hasattr(impl, op)}  # a plugin op: refused by name
    backend = Backend(name=name, ops=ops, notes=notes, route=impl.route, combine=impl.combine)
    backend.npu = npu  # the injected namespace (tests inspect NpuSim.calls)
    return backend


@register_backend("npu")
def make_npu_backend(cfg):
    return build_npu_backend("npu", load_torch_npu(), cfg)


@register_backend("npu_sim")
def make_npu_sim_backend(cfg):
    sim = NpuSim(has_swiglu_clip_quant=bool(cfg.get("sim_has_swiglu_clip_quant", False)))
    return build_npu_backend("npu_sim", sim, cfg)


# -- NPU post-load transforms (listed in conf/backend/npu*.yaml) -----------------------------------
@register("to_device", args=("device",), rule=lambda d, a, env: d[0])
def to_device(xs, args, env):
    """Move a runtime tensor to the backend's device (e.g. `npu`) before device-only casts."""
    return xs[0].to(args["device"])


def _namespace_for(t: torch.Tensor) -> Any:
    """The format cast belongs to where the tensor lives: torch_npu for NPU tensors (already
    imported, since the tensor exists), the simulator's record-only cast for CPU tensors."""
    if t.device.type == "npu":
        import torch_npu

        return torch_npu
    return NpuSim


@register("npu_format_cast", args=("acl_format", "view_dtype"), rule=lambda d, a, env: d[0])
def npu_format_cast(xs, args, env):
    """npu_format_cast to `acl_format` (29 = FRACTAL_NZ) of the bytes viewed as `view_dtype`: packed
    int4 weights are cast as int8 [E, K, N/2] then viewed back as int32 [E, K, N/8] (vllm-ascend's order)."""
    t = xs[0]
    view = parse_dtype(args["view_dtype"], "npu_format_cast.view_dtype") if args.get("view_dtype") else None
    src = t.view(view) if view is not None and view != t.dtype else t
    out = _namespace_for(t).npu_format_cast(src, int(args["acl_format"]))
    return out.view(t.dtype) if out.dtype != t.dtype else out
