"""Write a float transformers checkpoint folder in the FP8 release layout (spec section 12).

Every 2-D linear weight (and fused 3-D expert weights) becomes float8_e4m3fn with its fp32
`<name>_scale_inv` block scales (`quantize_block`); norms, embeddings, the router gate
(`mlp.gate`), `e_score_correction_bias` and lm_head stay as they are, as in DeepSeek-V3's
release. config.json gains `quantization_config: {quant_method: fp8, ...}`. Shards keep their
names and keys their order; other files (tokenizer, generation config) are copied. Tiny models
may use a small block (e.g. 16 x 16) so that tensors hold several full and partial blocks.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantfw.errors import CheckpointError
from quantfw.io.fp8 import DEFAULT_BLOCK, quantize_block, scale_key
from quantfw.io.reader import CheckpointReader

# Module names that FP8 releases keep in bf16 / fp32 (matched with re.search on the tensor key).
KEEP_FLOAT = (
    r"norm",
    r"embed",
    r"(^|\.)mlp\.gate\.weight$",
    r"e_score_correction_bias",
    r"lm_head",
    r"shared_head\.head",
)


def is_fp8_target(key: str, t: torch.Tensor) -> bool:
    """A linear weight an FP8 release stores as float8: 2-D `.weight` or fused 3-D experts."""
    linear = key.endswith(".weight") and t.dim() == 2
    fused = re.search(r"\.experts\.(gate_up_proj|down_proj)$", key) is not None and t.dim() == 3
    return (linear or fused) and t.is_floating_point() and not any(re.search(p, key) for p in KEEP_FLOAT)


def fp8_quantization_config(block: tuple[int, int]) -> dict:
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [int(block[0]), int(block[1])],
    }


def write_fp8_release(src: str | Path, dst: str | Path, block: tuple[int, int] = DEFAULT_BLOCK) -> Path:
    """`src` (float safetensors checkpoint folder) -> `dst` in the FP8 release layout; returns dst."""
    src, dst = Path(src), Path(dst)
    reader = CheckpointReader(src)
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"output {dst} exists and is not empty")
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for shard in reader.shards:
        out: dict[str, torch.Tensor] = {}
        for key, t in reader.iter_shard(shard):
            if is_fp8_target(key, t):
                if not torch.isfinite(t).all():
                    raise CheckpointError(f"{src / shard}: tensor '{key}' contains NaN or Inf")
                out[key], out[scale_key(key)] = quantize_block(t, block)
            else:
                out[key] = t.contiguous()
        save_file(out, str(dst / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, shard))
        total += sum(t.numel() * t.element_size() for t in out.values())
    if len(reader.shards) > 1 or (src / "model.safetensors.index.json").is_file():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {**reader.config(), "quantization_config": fp8_quantization_config(block)}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for p in reader.extra_files():
        if p.name != "config.json":
            shutil.copyfile(p, dst / p.name)
    return dst
