"""`quantfw plan`: what a recipe would create, on the meta device, and what the model would weigh."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from quantfw.api import build_layer, layer_dims
from quantfw.config.variants import compose_variant
from quantfw.formats.format import Format
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
    return sum(s.nbytes for s in fmt.loaded_layout(dims, scheme).values())


def run(cfg: DictConfig) -> dict:
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
        f"layer dims (this rank): E={dims.E} H={dims.H} I={dims.I} tp={dims.tp}  flags: {dict(layer.scheme.flags)}"
    )
    print("\nloaded (on disk, stacked over experts):")
    for name, s in layer.loaded_specs.items():
        print(f"  {name:<28} {str(list(s.shape)):<22} {_dtype(s.dtype):<9} {_fmt_bytes(s.nbytes):>12}")
    print("after post-load (what the kernels consume):")
    for name, (shape, dtype) in after.items():
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        print(f"  {name:<28} {str(list(shape)):<22} {_dtype(dtype):<9} {_fmt_bytes(nbytes):>12}")
    print("compute plan:", " -> ".join(s.op for s in layer.plan))

    full = Dims(E=m.num_experts, H=m.hidden_size, I=m.moe_intermediate_size)
    moe_layers = m.num_layers - m.first_moe_layer
    per_layer = expert_bytes(layer.scheme, layer.format, full)
    bf16 = 3 * full.E * full.H * full.I * 2
    w8 = compose_variant(["scheme=w8a8", "format=msmodelslim"])
    int8 = expert_bytes(Scheme.from_config(w8.scheme), Format.from_config(w8.format), full)
    print(f"\nrouted-expert memory of {m.name}: {moe_layers} MoE layers x {full.E} experts")
    rows = [("bf16", bf16), ("w8a8", int8), (layer.scheme.name, per_layer)]
    for label, b in rows:
        print(f"  {label:<12} {_fmt_bytes(b * moe_layers):>12}  ({b / bf16:.3f} of bf16)")
    return {
        "per_layer_bytes": per_layer,
        "moe_layers": moe_layers,
        "after": {k: list(v[0]) for k, v in after.items()},
    }
