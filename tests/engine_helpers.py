"""Tiny DeepSeek-V3 checkpoints for the engine tests: float with shared experts and an MTP layer,
and its FP8 release (spec section 12)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantfw.integrations.hf import save_tiny_checkpoint
from quantfw.io.fp8_release import write_fp8_release

MTP = 2  # tiny DeepSeek: num_hidden_layers = 2, so the MTP layer is index 2
BLOCK = (128, 128)


def deepseek_float(root: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Tiny DeepSeek-V3 (layer 0 dense, layer 1 MoE) plus one shared expert per MoE layer and the
    MTP layer (a copy of layer 1 with eh_proj, norms and shared_head), in `dtype`."""
    plain = save_tiny_checkpoint("deepseek_v3", root / "plain")
    t = load_file(str(plain / "model.safetensors"))
    cfg = json.loads((plain / "config.json").read_text())
    H, I = cfg["hidden_size"], cfg["moe_intermediate_size"]  # noqa: E741
    g = torch.Generator().manual_seed(3)
    for p, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
        t[f"model.layers.1.mlp.shared_experts.{p}.weight"] = torch.randn(*shape, generator=g) * 0.02
    for k in [k for k in t if k.startswith("model.layers.1.")]:
        t[k.replace("layers.1.", f"layers.{MTP}.")] = t[k] * 1.5
    p = f"model.layers.{MTP}."
    t[p + "eh_proj.weight"] = torch.randn(H, 2 * H, generator=g) * 0.02
    for n in ("enorm", "hnorm", "shared_head.norm"):
        t[p + n + ".weight"] = torch.ones(H)
    t[p + "shared_head.head.weight"] = t["lm_head.weight"].clone()
    cfg.update(n_shared_experts=1, num_nextn_predict_layers=1)
    out = root / f"float-{str(dtype).removeprefix('torch.')}"
    out.mkdir()
    save_file({k: v.to(dtype).contiguous() for k, v in t.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def deepseek_fp8(root: Path) -> tuple[Path, Path]:
    """(FP8 release, its float source)."""
    flt = deepseek_float(root)
    return write_fp8_release(flt, root / "fp8", BLOCK), flt
