"""Which weights of a transformers decoder read or write the residual stream, found by name.

A *side* is a list of (parameter, dim): the dim of the parameter that runs over the hidden size
H. Readers (what a norm feeds): attention q/k/v (and DeepSeek's q_a / kv_a) projections, the MLP's
gate/up projections, the router, the fused experts' gate_up_proj, shared-expert projections and
gates. Writers: o_proj, down_proj / w2, the fused experts' down_proj. Both the smoothing fold and
the rotation only ever touch these tensors along that dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantfw.errors import ConfigError

__all__ = ["DecoderSides", "decoder_sides", "mlp_readers", "scale_dim"]

_WRITERS = ("down_proj", "w2", "o_proj")


@dataclass
class DecoderSides:
    embed: nn.Parameter
    head: nn.Parameter
    final_norm: nn.Parameter
    # per layer: (input norm weight, attention readers, attention writers,
    #             post-attention norm weight, mlp readers, mlp writers)
    layers: list[tuple]


def _side(module: nn.Module, hidden: int, prefix: str) -> tuple[list, list]:
    """(readers, writers) of the parameters of `module` (attention or MLP) by name."""
    readers, writers = [], []
    transposed = bool(getattr(getattr(module, "experts", None), "is_transposed", False))
    for name, p in module.named_parameters():
        parts = name.split(".")
        leaf, owner = parts[-1], parts[-2] if len(parts) > 1 else ""
        if p.dim() < 2:
            if leaf == "bias" and owner in _WRITERS:
                writers.append((p, 0))
            continue
        if leaf == "down_proj" and owner == "experts":  # fused [E, H, I] (transposed [E, I, H])
            writers.append((p, p.dim() - (1 if transposed else 2)))
        elif leaf == "gate_up_proj" and owner == "experts":  # fused [E, 2I, H] ([E, H, 2I])
            readers.append((p, p.dim() - (2 if transposed else 1)))
        elif leaf == "weight" and owner in _WRITERS:
            writers.append((p, 0))
        elif leaf == "weight" and p.dim() == 2 and p.shape[1] == hidden:
            readers.append((p, 1))
        elif leaf == "weight":
            continue  # internal (e.g. DeepSeek q_b_proj / kv_b_proj read a low-rank latent)
        else:
            raise ConfigError(f"{prefix}.{name}: unknown parameter next to the residual stream")
    if not any(p.shape[d] == hidden for p, d in readers):
        raise ConfigError(f"{prefix}: found no projection reading the hidden size {hidden}")
    return readers, writers


def mlp_readers(layer: nn.Module, hidden: int, prefix: str = "layer") -> list:
    """The readers of the post-attention norm's output in one decoder layer (its MLP / MoE block)."""
    return _side(layer.mlp, hidden, f"{prefix}.mlp")[0]


def decoder_sides(model: nn.Module) -> DecoderSides:
    """Residual readers and writers of a Llama-style causal LM (model.model.{embed_tokens, layers,
    norm}, lm_head; each layer with input_layernorm, self_attn, post_attention_layernorm, mlp)."""
    inner = getattr(model, "model", None)
    names = ("embed_tokens", "layers", "norm")
    if inner is None or not all(hasattr(inner, n) for n in names) or not hasattr(model, "lm_head"):
        raise ConfigError(
            f"{type(model).__name__}: expected model.{{embed_tokens, layers, norm}} and lm_head"
        )
    hidden = inner.embed_tokens.weight.shape[1]
    layers = []
    for i, layer in enumerate(inner.layers):
        for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            if not hasattr(layer, n):
                raise ConfigError(f"{type(model).__name__}.model.layers.{i}: no {n}")
        ar, aw = _side(layer.self_attn, hidden, f"model.layers.{i}.self_attn")
        mr, mw = _side(layer.mlp, hidden, f"model.layers.{i}.mlp")
        layers.append((layer.input_layernorm.weight, ar, aw, layer.post_attention_layernorm.weight, mr, mw))
    return DecoderSides(inner.embed_tokens.weight, model.lm_head.weight, inner.norm.weight, layers)


def scale_dim(p: torch.Tensor, dim: int, s: torch.Tensor) -> None:
    """p *= s along dim, in place."""
    shape = [1] * p.dim()
    shape[dim] = -1
    p.mul_(s.to(p.dtype).view(shape))
