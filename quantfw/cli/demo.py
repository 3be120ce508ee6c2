"""`quantfw demo`, the main job: every scheme on the recipe's layer, error vs float."""

from __future__ import annotations

from omegaconf import DictConfig

from quantfw.api import components, layer_dims
from quantfw.config.variants import compose_variant
from quantfw.eval.scheme_table import Variant, evaluate_schemes, format_table
from quantfw.formats.format import Format
from quantfw.io.results import write_json
from quantfw.schemes.scheme import Scheme

VARIANTS = [
    ("w8a8", ["scheme=w8a8", "format=msmodelslim"], False),
    ("w4a8 g256", ["scheme=w4a8", "format=msmodelslim"], False),
    ("w4a8 per-channel", ["scheme=w4a8", "scheme.group_size=0", "format=msmodelslim"], False),
    ("w4a8_clip alpha=1", ["scheme=w4a8_clip", "format=compressed_tensors"], False),
    ("w4a8_clip learned alpha", ["scheme=w4a8_clip", "format=compressed_tensors"], True),
]


def run(cfg: DictConfig) -> list[dict]:
    scheme, fmt, backend = components(cfg)
    dims = layer_dims(cfg)
    variants = [
        Variant(
            f"recipe: {scheme.name}", scheme, fmt, learn_alpha=bool(scheme.flags.get("activation_use_clip"))
        )
    ]
    for label, overrides, learn in VARIANTS:
        v = compose_variant(overrides)
        variants.append(
            Variant(label, Scheme.from_config(v.scheme), Format.from_config(v.format), learn_alpha=learn)
        )
    print(
        f"model={cfg.model.name} E={dims.E} H={dims.H} I={dims.I} top-{cfg.model.top_k}, "
        f"{cfg.tokens} held-out tokens with outlier channels, backend={backend.name}"
    )
    rows = evaluate_schemes(variants, backend, dims, cfg.model.top_k, cfg.tokens, seed=cfg.seed)
    print(format_table(rows))
    if cfg.out:
        write_json(cfg.out, {"model": cfg.model.name, "tokens": cfg.tokens, "rows": rows})
    return rows
