"""`quantfw demo`, the main job: every scheme on the recipe's layer, error vs float."""

from __future__ import annotations

from omegaconf import DictConfig

from quantfw.api import components, layer_dims
from quantfw.eval.comparison import comparison_rows, label
from quantfw.eval.scheme_table import Variant, evaluate_schemes, format_table
from quantfw.io.results import write_json
from quantfw.progress import announce

# Above this much float weight memory, say the size before building the experts.
ANNOUNCE_BYTES = 256 * 2**20
# Peak RSS over fp32 expert bytes: 5.2 GB for 0.70 GB of experts (Kimi-K2 dims, 4 experts).
PEAK_FACTOR = 7.5


def run(cfg: DictConfig) -> list[dict]:
    scheme, fmt, backend = components(cfg)
    dims = layer_dims(cfg)
    learn = scheme.clips
    variants = [Variant(f"recipe: {label(scheme, fmt)}", scheme, fmt, learn_alpha=learn)]
    rows, notes = comparison_rows("demo", dims)
    variants += [Variant(r.label, r.scheme, r.format, learn_alpha=r.learn_alpha) for r in rows]
    print(
        f"model={cfg.model.name} E={dims.E} H={dims.H} I={dims.I} top-{cfg.model.top_k}, "
        f"{cfg.tokens} held-out tokens with outlier channels, backend={backend.name}"
    )
    for note in notes:
        print(f"note: {note}")
    float_bytes = 3 * dims.E * dims.H * (dims.I // dims.tp) * 4
    if float_bytes >= ANNOUNCE_BYTES:
        announce(
            "demo",
            f"building {dims.E} experts of {dims.H} x {dims.I // dims.tp} ({float_bytes / 1e9:.1f} GB fp32; "
            f"peak about {PEAK_FACTOR * float_bytes / 1e9:.1f} GB) and {len(variants)} quantized copies",
        )
    rows = evaluate_schemes(
        variants, backend, dims, cfg.model.top_k, cfg.tokens, seed=cfg.seed, progress=cfg.progress
    )
    print(format_table(rows))
    if cfg.out:
        write_json(cfg.out, {"model": cfg.model.name, "tokens": cfg.tokens, "rows": rows, "notes": notes})
    return rows
