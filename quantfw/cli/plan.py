"""`quantfw plan`: what a recipe would create, on the meta device, and what the model would weigh."""

from __future__ import annotations

import re

import torch
from omegaconf import DictConfig

from quantfw.api import build_layer, layer_dims
from quantfw.config.layer_choice import by_scheme, layer_schemes, parse_choices, ranges_text
from quantfw.errors import ConfigError
from quantfw.eval.comparison import comparison_rows, label
from quantfw.formats.format import Format
from quantfw.io.results import write_json
from quantfw.layout.spec import Dims
from quantfw.schemes.scheme import Scheme


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _dtype(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def expert_bytes(scheme: Scheme, fmt: Format, dims: Dims) -> int:
    """On-disk bytes of one MoE layer's experts in `fmt`."""
    return sum(s.nbytes for s in fmt.loaded_layout(dims, scheme).values())


def kernel_bytes(scheme: Scheme, dims: Dims) -> int:
    """Bytes of one MoE layer's experts in the runtime layout the kernels consume (after post-load)."""
    return sum(s.nbytes for s in scheme.runtime_layout(dims).values())


def layout_flags(scheme: Scheme, fmt: Format) -> dict:
    """The flags the layout, load steps or compute plan refer to (not observer parameters)."""
    declared = str([scheme.runtime, scheme.compute, fmt.tensors, fmt.load])
    names = set(re.findall(r"[A-Za-z_]\w*", declared))
    return {k: v for k, v in scheme.flags.items() if k in names}


def run(cfg: DictConfig) -> dict:
    if cfg.out and not str(cfg.out).endswith(".json"):
        raise ConfigError(f"out={cfg.out}: plan writes JSON; name the file *.json")
    layer = build_layer(cfg)
    dims = layer_dims(cfg)
    # Allocate the declared params on the meta device and run the real post-load pipeline on them.
    meta = {n: s.allocate("meta") for n, s in layer.loaded_specs.items()}
    layer.load(meta, source="meta tensors")
    after = {n: (tuple(t.shape), t.dtype) for n, t in layer.runtime_tensors().items()}
    m = cfg.model
    print(
        f"recipe: model={m.name} scheme={layer.scheme.name} format={layer.format.name} backend={cfg.backend.name}"
    )
    print(
        f"layer dims (this rank): E={dims.E} H={dims.H} I={dims.I} tp={dims.tp}  "
        f"flags: {layout_flags(layer.scheme, layer.format)}"
    )
    print(f"\nloaded (on disk as {layer.format.name}, stacked over experts):")
    for name, s in layer.loaded_specs.items():
        print(f"  {name:<28} {str(list(s.shape)):<22} {_dtype(s.dtype):<9} {_fmt_bytes(s.nbytes):>12}")
    print("after post-load (what the kernels consume):")
    for name, (shape, dtype) in after.items():
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        print(f"  {name:<28} {str(list(shape)):<22} {_dtype(dtype):<9} {_fmt_bytes(nbytes):>12}")
    print("compute plan:", " -> ".join(s.op for s in layer.plan))

    full = Dims(E=m.num_experts, H=m.hidden_size, I=m.moe_intermediate_size)
    moe_layers = m.num_layers - m.first_moe_layer
    bf16 = 3 * full.E * full.H * full.I * 2
    compare, notes = comparison_rows("plan", full)
    schemes = [(f"{label(layer.scheme, layer.format)} (recipe)", layer.scheme, layer.format)]
    schemes = [(r.label, r.scheme, r.format) for r in compare] + schemes
    print(f"\nrouted-expert memory of {m.name}: {moe_layers} MoE layers x {full.E} experts")
    print(f"  {'':<44} {'on disk':>12} {'kernel memory':>14}  (of bf16)")
    print(f"  {'bf16':<44} {_fmt_bytes(bf16 * moe_layers):>12} {_fmt_bytes(bf16 * moe_layers):>14}  (1.000)")
    rows = [{"label": "bf16", "disk_bytes": bf16 * moe_layers, "kernel_bytes": bf16 * moe_layers}]
    for text, scheme, fmt in schemes:
        disk, kernel = expert_bytes(scheme, fmt, full) * moe_layers, kernel_bytes(scheme, full) * moe_layers
        rows.append(
            {
                "label": text,
                "scheme": scheme.name,
                "format": fmt.name,
                "disk_bytes": disk,
                "kernel_bytes": kernel,
            }
        )
        print(
            f"  {text:<44} {_fmt_bytes(disk):>12} {_fmt_bytes(kernel):>14}  ({disk / (bf16 * moe_layers):.3f})"
        )
    for note in notes:
        print(f"  note: {note}")
    per_layer = expert_bytes(layer.scheme, layer.format, full)
    choices = choice_rows(cfg, layer.scheme, layer.format, full)
    result = {
        "model": m.name,
        "scheme": layer.scheme.name,
        "format": layer.format.name,
        "flags": layout_flags(layer.scheme, layer.format),
        "per_layer_bytes": per_layer,
        "moe_layers": moe_layers,
        "memory": rows,
        "notes": notes,
        "after": {k: list(v[0]) for k, v in after.items()},
    }
    if choices:
        result["layers"] = choices
    if cfg.out:
        write_json(cfg.out, result)
    return result


def choice_rows(cfg: DictConfig, recipe_scheme: Scheme, fmt: Format, full: Dims) -> list[dict]:
    """The recipe's per-layer scheme choices (`layers`) with their routed-expert bytes, printed;
    the recipe's scheme holds the MoE layers no choice names."""
    chosen = layer_schemes(cfg)
    if not chosen:
        return []
    m = cfg.model
    moe = range(m.first_moe_layer, m.num_layers)
    groups = [
        (name, layers, chosen[layers[0]]) for name, layers in by_scheme(parse_choices(cfg.layers)).items()
    ]
    rest = [layer for layer in moe if layer not in chosen]
    groups.append((f"{recipe_scheme.name} (recipe)", rest, recipe_scheme))
    print(f"\nper-layer scheme choices (layers), routed experts of {m.name} in {fmt.name}:")
    print(f"  {'layers':<16} {'scheme':<32} {'MoE layers':>10} {'on disk':>12} {'kernel memory':>14}")
    rows, disk_total, kernel_total = [], 0, 0
    for name, layers, scheme in groups:
        n = sum(1 for layer in layers if layer in moe)
        disk, kernel = expert_bytes(scheme, fmt, full), kernel_bytes(scheme, full)
        disk_total, kernel_total = disk_total + n * disk, kernel_total + n * kernel
        row = {"layers": ranges_text(layers), "scheme": scheme.name, "moe_layers": n}
        row.update(
            disk_bytes=n * disk, kernel_bytes=n * kernel, layer_disk_bytes=disk, layer_kernel_bytes=kernel
        )
        dense = [layer for layer in layers if layer < m.first_moe_layer]
        beyond = [layer for layer in layers if layer >= m.num_layers]
        notes = []
        if dense:
            notes.append(f"{ranges_text(dense)}: dense (no routed experts): MLP linears written W8A8")
        if beyond:
            notes.append(
                f"{ranges_text(beyond)}: beyond num_layers={m.num_layers} (an MTP layer, if the checkpoint has one): "
                f"{_fmt_bytes(disk)} on disk / {_fmt_bytes(kernel)} kernel each, not in the total"
            )
        row["notes"] = notes
        rows.append(row)
        text = label(scheme, fmt).split(" [")[0] + (" (recipe)" if name.endswith("(recipe)") else "")
        print(
            f"  {row['layers'] or '-':<16} {text:<32} {n:>10} {_fmt_bytes(n * disk):>12} {_fmt_bytes(n * kernel):>14}"
        )
        for note in notes:
            print(f"    note: layers {note}")
    print(
        f"  {'total':<16} {'':<32} {len(moe):>10} {_fmt_bytes(disk_total):>12} {_fmt_bytes(kernel_total):>14}"
    )
    rows.append(
        {"layers": "total", "moe_layers": len(moe), "disk_bytes": disk_total, "kernel_bytes": kernel_total}
    )
    return rows
