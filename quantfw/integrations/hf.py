"""transformers (>= 5) plumbing: tiny random MoE models, expert/router extraction, expert swapping.

An *experts module* is any nn.Module with
``forward(hidden_states [T, H], topk_weights [T, k] fp32, topk_ids [T, k] int64) -> [T, H]``;
an *experts factory* is ``factory(w13 [E, 2I, H] fp32, w2 [E, H, I] fp32, layer_index) -> module``.
`swap_moe_experts` replaces every MoE block of a model by a `SwappedMoEBlock` that keeps the
original router module (its logits; routing re-done with `quantfw.moe.routing`), runs the
factory-built experts module and adds the shared experts in float.

Expert weight names, transformers 5.24 (verified with `save_pretrained(safe_serialization=True)`
and a reload; L = layer, e = expert, E experts, I = moe intermediate, H = hidden):

In memory (all three archs fuse the experts into 3D parameters; gate rows first):
  model.layers.L.mlp.experts.gate_up_proj   [E, 2I, H]  rows [0, I) = gate (w1), [I, 2I) = up (w3)
  model.layers.L.mlp.experts.down_proj      [E, H, I]   (w2)
  model.layers.L.mlp.gate.weight            [E, H]      router (a *TopKRouter module, not nn.Linear;
                                                        its forward returns (logits, weights, ids))
  DeepSeek-V3 also: mlp.gate.e_score_correction_bias [E] fp32 (persistent buffer),
  mlp.shared_experts.{gate_proj,up_proj}.weight [n_shared*I, H], .down_proj.weight [H, n_shared*I];
  layers L < first_k_dense_replace are dense: mlp.{gate,up,down}_proj.weight (intermediate_size).
  Mixtral's attribute is `mlp` in memory (it was `block_sparse_moe` in transformers 4).
  The experts classes carry is_transposed=False, has_bias=False, has_gate=True and dispatch on
  config._experts_implementation (default "grouped_mm" on CPU too; "eager" is the python loop).

On disk (save_pretrained reverses the load-time conversion: per-expert 2D keys, no fused keys):
  Mixtral:      model.layers.L.block_sparse_moe.gate.weight            [E, H]
                model.layers.L.block_sparse_moe.experts.e.w1.weight    [I, H]  (gate)
                model.layers.L.block_sparse_moe.experts.e.w3.weight    [I, H]  (up)
                model.layers.L.block_sparse_moe.experts.e.w2.weight    [H, I]  (down)
  Qwen3-MoE:    model.layers.L.mlp.gate.weight                         [E, H]
                model.layers.L.mlp.experts.e.gate_proj.weight          [I, H]
                model.layers.L.mlp.experts.e.up_proj.weight            [I, H]
                model.layers.L.mlp.experts.e.down_proj.weight          [H, I]
  DeepSeek-V3:  as Qwen3-MoE, plus model.layers.L.mlp.gate.e_score_correction_bias [E] and
                model.layers.L.mlp.shared_experts.{gate,up,down}_proj.weight (unchanged names).
The loader (conversion_mapping.py: "mixtral", and "qwen2_moe" which qwen3_moe / deepseek_v3 alias)
stacks experts along dim 0 and concatenates [gate; up] along dim 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantfw.errors import BackendUnavailable, ConfigError
from quantfw.moe.routing import grouped_topk_sigmoid, softmax_topk

__all__ = [
    "ARCHS",
    "MoEBlockInfo",
    "MoERouter",
    "SwapEntry",
    "SwapReport",
    "SwappedMoEBlock",
    "block_info",
    "extract_expert_weights",
    "find_moe_blocks",
    "make_router",
    "save_tiny_checkpoint",
    "swap_moe_experts",
    "tiny_moe_config",
    "tiny_moe_model",
]

ARCHS = ("mixtral", "qwen3_moe", "deepseek_v3")
ExpertsFactory = Callable[[torch.Tensor, torch.Tensor, int], nn.Module]

_HINT = "pip install 'quantfw[hf]'"


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendUnavailable(f"transformers is not installed ({_HINT})") from exc
    return transformers


require_transformers = _transformers  # the public name for other packages


# --------------------------------------------------------------------------- tiny models


def tiny_moe_config(
    arch: str,
    *,
    hidden_size: int = 512,
    moe_intermediate_size: int = 256,
    num_experts: int = 8,
    top_k: int = 2,
    num_layers: int = 2,
    vocab_size: int = 1000,
    **overrides: Any,
):
    """Config of a tiny `arch` model (defaults valid for every scheme: H=512, I=256, E=8, top-2).

    DeepSeek-V3: layer 0 is dense (first_k_dense_replace=1), 1 shared expert, n_group=4 /
    topk_group=2 when E allows it, routed_scaling_factor=2.5, norm_topk_prob=True.
    Qwen3-MoE: norm_topk_prob=True (as the released models). `overrides` go to the config class.
    """
    tf = _transformers()
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    if arch == "mixtral":
        kw = dict(common, head_dim=64, intermediate_size=moe_intermediate_size)
        kw.update(num_local_experts=num_experts, num_experts_per_tok=top_k)
        cls = tf.MixtralConfig
    elif arch == "qwen3_moe":
        kw = dict(common, head_dim=64, moe_intermediate_size=moe_intermediate_size)
        kw.update(intermediate_size=2 * moe_intermediate_size, num_experts=num_experts)
        kw.update(num_experts_per_tok=top_k, norm_topk_prob=True, decoder_sparse_step=1)
        cls = tf.Qwen3MoeConfig
    elif arch == "deepseek_v3":
        n_group = 4 if num_experts % 4 == 0 and num_experts >= 8 else 1
        topk_group = max(1, n_group // 2)
        kw = dict(common, num_key_value_heads=4, moe_intermediate_size=moe_intermediate_size)
        kw.update(intermediate_size=2 * moe_intermediate_size, n_routed_experts=num_experts)
        kw.update(num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group, n_shared_experts=1)
        kw.update(first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True)
        kw.update(q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
        cls = tf.DeepseekV3Config
    else:
        raise ConfigError(f"unknown tiny model arch {arch!r}; allowed: {', '.join(ARCHS)}")
    kw.update(overrides)
    return cls(**kw)


def tiny_moe_model(arch: str, seed: int = 0, **dims: Any):
    """A tiny random fp32 `arch` causal LM in eval mode, built offline (see `tiny_moe_config`).

    DeepSeek-V3's e_score_correction_bias (zeros at init) gets seeded N(0, 0.05) values so that
    the biased selection path is exercised.
    """
    tf = _transformers()
    config = tiny_moe_config(arch, **dims)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                with torch.no_grad():
                    bias.copy_(0.05 * torch.randn(bias.shape))
    return model.eval()


def save_tiny_checkpoint(arch: str, directory: str | Path, seed: int = 0, **dims: Any) -> Path:
    """Save `tiny_moe_model(arch, seed, **dims)` with save_pretrained(safe_serialization=True)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tiny_moe_model(arch, seed=seed, **dims).save_pretrained(directory, safe_serialization=True)
    return directory


# --------------------------------------------------------------------------- inspection


@dataclass(frozen=True)
class MoEBlockInfo:
    """What a MoE block is: dims, routing rule and expert storage."""

    block_class: str
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    routing: str  # "softmax_topk" | "grouped_topk_sigmoid"
    renormalize: bool
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    has_correction_bias: bool = False
    has_shared_experts: bool = False
    experts_layout: str = "fused"  # "fused" | "fused_transposed" | "per_expert"


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def _is_moe_block(module: nn.Module) -> bool:
    return (
        not isinstance(module, SwappedMoEBlock)
        and isinstance(getattr(module, "gate", None), nn.Module)
        and isinstance(getattr(module, "experts", None), nn.Module)
    )


def find_moe_blocks(model: nn.Module) -> list[tuple[int, str, MoEBlockInfo]]:
    """Every (not yet swapped) MoE block: (layer_index, module_path, MoEBlockInfo), in model order.

    A MoE block is a module with a `gate` (router) and an `experts` child, e.g. MixtralSparseMoeBlock,
    Qwen3MoeSparseMoeBlock, DeepseekV3MoE. Dense MLPs (DeepSeek's first layers) are skipped.
    """
    found = []
    for path, module in model.named_modules():
        if not _is_moe_block(module):
            continue
        match = _LAYER_RE.search(path)
        if match is None:
            raise ConfigError(f"MoE block {path!r} is not under a numbered `layers.N` module")
        found.append((int(match.group(1)), path, block_info(module)))
    return found


def _experts_layout(experts: nn.Module) -> str:
    if isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
        if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
            raise ConfigError(
                f"{type(experts).__name__}: experts with biases or without a gate are not SwiGLU experts"
            )
        return "fused_transposed" if getattr(experts, "is_transposed", False) else "fused"
    if isinstance(experts, (nn.ModuleList, nn.Sequential)) and len(experts) > 0:
        return "per_expert"
    raise ConfigError(f"{type(experts).__name__}: unknown experts layout (no gate_up_proj, not a ModuleList)")


def _per_expert_linears(expert: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    for names in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
        mods = [getattr(expert, n, None) for n in names]
        if all(isinstance(m, nn.Linear) for m in mods):
            if any(m.bias is not None for m in mods):
                raise ConfigError(f"{type(expert).__name__}: expert projections with bias are not supported")
            return mods[0], mods[1], mods[2]
    raise ConfigError(
        f"{type(expert).__name__}: expert has neither gate/up/down_proj nor w1/w3/w2 Linear layers"
    )


def _check_activation(block: nn.Module) -> None:
    act = None
    for owner in (block.experts, block):
        config = getattr(owner, "config", None)
        act = getattr(config, "hidden_act", None) or act
    if act is not None and act not in ("silu", "swish"):
        raise ConfigError(
            f"{type(block).__name__}: hidden_act={act!r}, only SwiGLU (silu) experts are supported"
        )


def extract_expert_weights(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [E, 2I, H], w2 [E, H, I]) as fp32 copies from a MoE block (or its `experts` module).

    Handles transformers-5 fused experts (gate_up_proj [E, 2I, H] / down_proj [E, H, I], or the
    is_transposed variant [E, H, 2I] / [E, I, H]) and per-expert ModuleLists with gate/up/down_proj
    or Mixtral-style w1/w3/w2 Linear layers.
    """
    experts = block.experts if _is_moe_block(block) else block
    layout = _experts_layout(experts)
    with torch.no_grad():
        if layout == "per_expert":
            lins = [_per_expert_linears(e) for e in experts]
            w13 = torch.stack([torch.cat([g.weight, u.weight], dim=0) for g, u, _ in lins])
            w2 = torch.stack([d.weight for _, _, d in lins])
        else:
            w13, w2 = experts.gate_up_proj, experts.down_proj
            if layout == "fused_transposed":
                w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
        w13 = w13.detach().to(torch.float32, copy=True).contiguous()
        w2 = w2.detach().to(torch.float32, copy=True).contiguous()
    num_experts, two_i, hidden = w13.shape
    if two_i % 2 or tuple(w2.shape) != (num_experts, hidden, two_i // 2):
        raise ConfigError(
            f"{type(experts).__name__}: w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} "
            "are not [E, 2I, H] / [E, H, I]"
        )
    return w13, w2


def block_info(block: nn.Module) -> MoEBlockInfo:
    """Routing rule, dims and layout of one MoE block (raises ConfigError for unsupported ones)."""
    gate, experts = block.gate, block.experts
    name = type(block).__name__
    if hasattr(block, "shared_expert_gate"):
        raise ConfigError(f"{name}: gated shared experts (Qwen2-MoE style) are not supported")
    layout = _experts_layout(experts)
    _check_activation(block)
    weight = getattr(gate, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ConfigError(f"{name}: router {type(gate).__name__} has no [E, H] weight")
    num_experts, hidden = weight.shape
    top_k = getattr(gate, "top_k", None) or getattr(block, "top_k", None)
    if top_k is None:
        raise ConfigError(f"{name}: cannot find top_k on the block or its router")
    if layout == "per_expert":
        inter = _per_expert_linears(experts[0])[0].weight.shape[0]
    else:
        inter = experts.down_proj.shape[2 if layout == "fused" else 1]
    common = dict(
        block_class=name,
        num_experts=num_experts,
        top_k=int(top_k),
        hidden_size=hidden,
        intermediate_size=int(inter),
        has_shared_experts=isinstance(getattr(block, "shared_experts", None), nn.Module),
        experts_layout=layout,
    )
    if hasattr(gate, "e_score_correction_bias") or hasattr(gate, "num_group"):
        bias = getattr(gate, "e_score_correction_bias", None)
        return MoEBlockInfo(
            routing="grouped_topk_sigmoid",
            renormalize=bool(getattr(gate, "norm_topk_prob", True)),
            n_group=int(getattr(gate, "num_group", None) or getattr(gate, "n_group", 1)),
            topk_group=int(getattr(gate, "topk_group", 1)),
            routed_scaling_factor=float(getattr(gate, "routed_scaling_factor", 1.0)),
            has_correction_bias=isinstance(bias, torch.Tensor),
            **common,
        )
    norm = getattr(gate, "norm_topk_prob", getattr(block, "norm_topk_prob", None))
    if norm is None:
        if "Mixtral" not in name and "Mixtral" not in type(gate).__name__:
            raise ConfigError(
                f"{name}: unknown router {type(gate).__name__} (no norm_topk_prob, not Mixtral)"
            )
        norm = True  # Mixtral: softmax over the top-k logits
    return MoEBlockInfo(routing="softmax_topk", renormalize=bool(norm), **common)


# --------------------------------------------------------------------------- routing


class MoERouter:
    """router(hidden [T, H]) -> (topk_weights fp32 [T, k], topk_ids int64 [T, k]) for one block.

    The logits come from the block's own router module (so transformers' router_logits recording
    keeps working); the selection and weights are recomputed with `quantfw.moe.routing`.
    """

    def __init__(self, gate: nn.Module, info: MoEBlockInfo):
        self.gate = gate
        self.info = info

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.gate(hidden)
        return out[0] if isinstance(out, tuple) else out

    def route_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        info = self.info
        if info.routing == "softmax_topk":
            return softmax_topk(logits, info.top_k, renormalize=info.renormalize)
        bias = getattr(self.gate, "e_score_correction_bias", None)
        return grouped_topk_sigmoid(
            logits,
            info.top_k,
            n_group=info.n_group,
            topk_group=info.topk_group,
            correction_bias=bias,
            renormalize=info.renormalize,
            routed_scaling_factor=info.routed_scaling_factor,
        )

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.route_logits(self.logits(hidden.reshape(-1, self.info.hidden_size)))


def make_router(block: nn.Module, info: MoEBlockInfo | None = None) -> MoERouter:
    """The exact routing of `block` (Mixtral / Qwen3-MoE softmax, DeepSeek-V3 grouped sigmoid)."""
    return MoERouter(block.gate, info or block_info(block))


# --------------------------------------------------------------------------- swapping


class SwappedMoEBlock(nn.Module):
    """Drop-in for a transformers MoE block: [B, S, H] -> [B, S, H], like the original.

    original router logits -> quantfw routing -> experts module -> + shared experts (float).
    Eval only: Mixtral's training-time router jitter is not applied.
    """

    def __init__(self, gate: nn.Module, experts: nn.Module, info: MoEBlockInfo, shared_experts=None):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.shared_experts = shared_experts
        self.info = info
        self._router = MoERouter(gate, info)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        weights, ids = self._router(flat)
        out = self.experts(flat, weights, ids).to(hidden_states.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.reshape(shape)


@dataclass
class SwapEntry:
    layer_index: int
    path: str
    info: MoEBlockInfo
    experts_class: str


@dataclass
class SwapReport:
    entries: list[SwapEntry] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.entries)} MoE block(s)"]
        for e in self.entries:
            i = e.info
            lines.append(
                f"  layer {e.layer_index:>3} {e.path}: {i.block_class} E={i.num_experts} k={i.top_k} "
                f"H={i.hidden_size} I={i.intermediate_size} {i.routing} shared={i.has_shared_experts} "
                f"-> {e.experts_class}"
            )
        return "\n".join(lines)


def swap_moe_experts(model: nn.Module, factory: ExpertsFactory) -> SwapReport:
    """Replace every MoE block's experts by `factory(w13, w2, layer_index)`, in place.

    The router and shared experts stay the original float modules. Returns a SwapReport.
    """
    blocks = find_moe_blocks(model)
    if not blocks:
        raise ConfigError(f"{type(model).__name__}: no MoE blocks (modules with `gate` and `experts`) found")
    report = SwapReport()
    for layer_index, path, info in blocks:
        block = model.get_submodule(path)
        w13, w2 = extract_expert_weights(block)
        experts = factory(w13, w2, layer_index)
        if not isinstance(experts, nn.Module):
            raise ConfigError(
                f"experts factory returned {type(experts).__name__} for layer {layer_index}, not nn.Module"
            )
        del w13, w2
        wrapper = SwappedMoEBlock(block.gate, experts, info, getattr(block, "shared_experts", None))
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, wrapper)
        report.entries.append(SwapEntry(layer_index, path, info, type(experts).__name__))
    return report
