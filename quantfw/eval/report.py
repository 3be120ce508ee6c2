"""`quantfw eval` results: the JSON document, its schema check, the comparison rows/table, the plot.

The `out` JSON (schema "quantfw.eval/1", documented in docs/evaluation.md) holds the full result of
the job that wrote it (`layers` with per-expert rows, `perplexity`, `alpha_calibration`) plus
`runs`: one summary row per job that ever wrote this file. A job replaces the row with the same
key (checkpoint, reference, overrides, tokens, seed), so `--multirun checkpoint=A,B` or repeated
runs build one comparison; `eval.table=FILE.md` re-renders the markdown table from all rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from quantfw.errors import BackendUnavailable, ConfigError
from quantfw.io.results import write_json

SCHEMA = "quantfw.eval/1"
NUM = (int, float)
OPT_NUM = (int, float, type(None))
# key -> allowed types, per object; the whole layout of an eval JSON document.
METRICS = {"rel_l2": OPT_NUM, "cosine": OPT_NUM, "max_abs": OPT_NUM}
EXPERT_KEYS = {"expert": (int,), "tokens": (int,), **METRICS}
LAYER_KEYS = {"layer": (int,), "scheme": (str,), "format": (str,), "tokens": (int,), **METRICS}
PPL_KEYS = {
    "float": NUM,
    "quantized": NUM,
    "delta": NUM,
    "delta_ci95": (list, type(None)),
    "windows": (int,),
    "predicted_tokens": (int,),
    "token_source": (str,),
}
ROW_KEYS = {
    "key": (str,),
    "checkpoint": (str,),
    "scheme": (str,),
    "format": (str,),
    "alpha": (str,),
    "layers": (int,),
    "rel_l2_mean": NUM,
    "rel_l2_max": NUM,
    "cosine_min": NUM,
    "expert_rel_l2_max": OPT_NUM,
    "ppl_float": OPT_NUM,
    "ppl_quantized": OPT_NUM,
    "ppl_delta": OPT_NUM,
}
TOP_KEYS = {
    "schema": (str,),
    "checkpoint": (str,),
    "reference": (str,),
    "recipe_overrides": (list,),
    "tokens": (int,),
    "seed": (int,),
    "layers": (list,),
    "perplexity": (dict, type(None)),
    "alpha_calibration": (dict, type(None)),
    "runs": (list,),
}


def _check(obj: Any, keys: Mapping[str, tuple], where: str) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: expected an object, found {type(obj).__name__}"]
    out = [f"{where}.{k}: missing" for k in keys if k not in obj]
    for k, types in keys.items():
        if k in obj and (not isinstance(obj[k], types) or isinstance(obj[k], bool)):
            out.append(f"{where}.{k}: expected {'/'.join(t.__name__ for t in types)}, found {obj[k]!r}")
    return out


def schema_problems(doc: Any) -> list[str]:
    """Every way `doc` departs from the eval JSON schema (empty = valid)."""
    problems = _check(doc, TOP_KEYS, "$")
    if problems and not isinstance(doc, dict):
        return problems
    if doc.get("schema") != SCHEMA:
        problems.append(f"$.schema: expected {SCHEMA!r}, found {doc.get('schema')!r}")
    for i, layer in enumerate(doc.get("layers") or []):
        problems += _check(layer, LAYER_KEYS, f"$.layers[{i}]")
        for j, e in enumerate(layer.get("experts", []) if isinstance(layer, dict) else []):
            problems += _check(e, EXPERT_KEYS, f"$.layers[{i}].experts[{j}]")
        alphas = layer.get("alphas") if isinstance(layer, dict) else None
        if alphas is not None and not all(isinstance(a, NUM) and 0 < a <= 1 for a in alphas):
            problems.append(f"$.layers[{i}].alphas: expected numbers in (0, 1]")
    if isinstance(doc.get("perplexity"), dict):
        problems += _check(doc["perplexity"], PPL_KEYS, "$.perplexity")
    for i, row in enumerate(doc.get("runs") or []):
        problems += _check(row, ROW_KEYS, f"$.runs[{i}]")
    return problems


def _finite(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def summary_row(doc: Mapping[str, Any]) -> dict:
    """The comparison-table row of one eval document."""
    layers = doc["layers"]
    experts = [e["rel_l2"] for r in layers for e in r.get("experts", []) if e["rel_l2"] is not None]
    alphas = [a for r in layers for a in r.get("alphas", [])]
    if not alphas:
        alpha = "-"
    elif all(a == 1 for a in alphas):
        alpha = "1 (no clip)"
    else:
        alpha = f"learned {min(alphas):.3f}-{max(alphas):.3f}"
    ppl = doc.get("perplexity") or {}
    key = json.dumps(
        [doc["checkpoint"], doc["reference"], doc["recipe_overrides"], doc["tokens"], doc["seed"]]
    )
    return {
        "key": key,
        "checkpoint": doc["checkpoint"],
        "scheme": layers[0]["scheme"] if layers else "",
        "format": layers[0]["format"] if layers else "",
        "alpha": alpha,
        "layers": len(layers),
        "rel_l2_mean": sum(r["rel_l2"] for r in layers) / max(len(layers), 1),
        "rel_l2_max": max((r["rel_l2"] for r in layers), default=0.0),
        "cosine_min": min((r["cosine"] for r in layers), default=1.0),
        "expert_rel_l2_max": max(experts) if experts else None,
        "ppl_float": _finite(ppl.get("float")),
        "ppl_quantized": _finite(ppl.get("quantized")),
        "ppl_delta": _finite(ppl.get("delta")),
    }


def write_results(path: str | Path, doc: dict) -> dict:
    """Write `doc` to `path`, carrying over the `runs` rows already there (same key: replaced)."""
    path = Path(path)
    rows: list[dict] = []
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise ConfigError(f"{path}: exists but is not JSON; choose another out=FILE.json") from None
        if not isinstance(old, dict) or old.get("schema") != SCHEMA:
            raise ConfigError(
                f"{path}: exists but is not a quantfw eval result (schema {SCHEMA}); choose another out="
            )
        rows = list(old.get("runs", []))
    row = summary_row(doc)
    rows = [r for r in rows if r.get("key") != row["key"]] + [row]
    doc = {**doc, "runs": rows}
    problems = schema_problems(doc)
    if problems:  # a bug, not user input: the writer must produce what it documents
        raise AssertionError("; ".join(problems[:3]))
    write_json(path, doc)
    return doc


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    head = (
        "| checkpoint | scheme | format | alpha | layer rel_l2 (mean / max) | min cosine "
        "| worst expert rel_l2 | ppl float | ppl quantized | Δ ppl |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        delta = None if r.get("ppl_delta") is None else 100 * r["ppl_delta"]
        lines.append(
            f"| {Path(r['checkpoint']).name} | {r['scheme']} | {r['format']} | {r['alpha']} "
            f"| {r['rel_l2_mean']:.4f} / {r['rel_l2_max']:.4f} | {r['cosine_min']:.5f} "
            f"| {_fmt(r.get('expert_rel_l2_max'), '.4f')} | {_fmt(r.get('ppl_float'), '.3f')} "
            f"| {_fmt(r.get('ppl_quantized'), '.3f')} | {_fmt(delta, '+.2f')}{'%' if delta is not None else ''} |"
        )
    return "\n".join(lines) + "\n"


def plot(doc: Mapping[str, Any], path: str | Path) -> Path:
    """PNG: rel_l2 per expert (one line per layer, layer-level error dashed) and, when the
    checkpoint has alphas, their histogram."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BackendUnavailable("eval.plot needs matplotlib (pip install 'quantfw[plot]')") from None
    layers = doc["layers"]
    alphas = [a for r in layers for a in r.get("alphas", [])]
    fig, axes = plt.subplots(1, 2 if alphas else 1, figsize=(11 if alphas else 6.5, 4), squeeze=False)
    ax = axes[0][0]
    for r in layers:
        experts = [e for e in r.get("experts", []) if e["rel_l2"] is not None]
        line = ax.plot([e["expert"] for e in experts], [e["rel_l2"] for e in experts], marker="o", ms=3)
        ax.axhline(r["rel_l2"], ls="--", lw=0.8, color=line[0].get_color() if line else None)
        if line:
            line[0].set_label(f"layer {r['layer']}")
    ax.set_xlabel("expert")
    ax.set_ylabel("relative L2 error vs float")
    ax.set_title(f"{layers[0]['scheme'] if layers else ''}: error by expert (dashed: whole layer)")
    if len(layers) <= 12:
        ax.legend(fontsize=7)
    if alphas:
        ax2 = axes[0][1]
        lo = min(alphas)
        ax2.hist(alphas, bins=20, range=(max(0.0, lo - 0.1 * (1 - lo) - 1e-3), 1.0))
        ax2.set_xlabel("alpha (clip factor)")
        ax2.set_ylabel("experts")
        ax2.set_title(f"alphas: {len(alphas)} experts, mean {sum(alphas) / len(alphas):.3f}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def perplexity_line(ppl: Mapping[str, Any]) -> str:
    """Float vs quantized perplexity and the delta with its 95% interval (when there are windows
    enough to estimate one)."""
    ci = ppl.get("delta_ci95")
    interval = f", 95% interval [{100 * ci[0]:+.2f}%, {100 * ci[1]:+.2f}%]" if ci else ", no interval (one window)"
    return (
        f"perplexity ({ppl['predicted_tokens']} tokens, {ppl['windows']} windows, {ppl['token_source']}): "
        f"float {ppl['float']:.3f}, quantized {ppl['quantized']:.3f}, delta {100 * ppl['delta']:+.2f}%{interval}"
    )
