"""`quantfw example out=DIR [model=tiny|tiny_deepseek_v3|tiny_qwen3_moe|tiny_mixtral] [dtype=bf16|fp8]`:
a small random float checkpoint in the real release layout to try quantize / check / eval on.

Written by transformers' `save_pretrained` from the recipe model's dims and `hf_model_type`
(its on-disk key names are the real ones); `dtype=fp8` turns it into the DeepSeek FP8 release
layout (float8_e4m3fn weights with block `weight_scale_inv`). Needs the `hf` extra.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from quantfw.errors import ConfigError

DTYPES = ("bf16", "fp8")


def _check_out(out: str | None) -> Path:
    if not out:
        raise ConfigError("example needs out=DIR (a new or empty folder)")
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"out={out}: exists and is not an empty folder; choose a new one")
    return path


def run(cfg: DictConfig) -> str:
    out = _check_out(cfg.out)
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype}: expected one of {', '.join(DTYPES)}")
    from quantfw.integrations.hf import ARCHS, tiny_moe_model
    from quantfw.progress import quiet_transformers

    quiet_transformers(cfg.progress)

    m = cfg.model
    if m.hf_model_type not in ARCHS:
        raise ConfigError(
            f"model={m.name}: hf_model_type '{m.hf_model_type}' cannot be written "
            f"(expected one of {', '.join(ARCHS)}; e.g. model=tiny_deepseek_v3)"
        )
    dims = dict(
        hidden_size=m.hidden_size,
        moe_intermediate_size=m.moe_intermediate_size,
        num_experts=m.num_experts,
        top_k=m.top_k,
        num_layers=m.num_layers,
    )
    model = tiny_moe_model(m.hf_model_type, seed=cfg.seed, **dims).to(torch.bfloat16)
    if cfg.dtype == "bf16":
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
    else:
        from quantfw.io.fp8_release import write_fp8_release

        with tempfile.TemporaryDirectory(prefix="quantfw-example-") as tmp:
            model.save_pretrained(tmp)
            write_fp8_release(tmp, out)
    print(
        f"quantfw example: wrote {out} ({m.hf_model_type}, {cfg.dtype}, {m.num_layers} layers, "
        f"{m.num_experts} experts of {m.hidden_size} x {m.moe_intermediate_size})",
        file=sys.stderr,
    )
    return str(out)
