"""`bench` under torchrun: forward latency of the expert-parallel layer (quantfw.moe.parallel).

Each rank quantizes only the random float experts its placement gives it (per-expert seeds, so
the layer is the same for any number of ranks), feeds its share of every batch, and runs exactly
`bench.repeats` timed calls (a collective must be entered the same number of times on every
rank, so there is no time budget). A record's median is the slowest rank's median; records also
hold every rank's peak RSS.
"""

from __future__ import annotations

import resource
import statistics

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig, OmegaConf

from quantfw.backends import get_backend
from quantfw.config.variants import compose_variant
from quantfw.errors import ConfigError
from quantfw.eval.bench import (
    BenchLayer,
    bench_modes,
    machine,
    scheme_variants,
    selected_variants,
    time_ms,
    uniform_routing,
    with_mode,
)
from quantfw.formats.format import Format
from quantfw.layout.spec import Dims
from quantfw.moe.layer import MoELayer
from quantfw.moe.parallel import ParallelMoE
from quantfw.parallel.placement import Placement
from quantfw.quantize.experts import quantize_experts
from quantfw.schemes.scheme import Scheme


def float_expert(dims: Dims, e: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float w13 [2I, H], w2 [H, I] of expert e (its own generator)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + e)
    w13 = torch.randn(2 * dims.I, dims.H, generator=g) * dims.H**-0.5
    return w13, torch.randn(dims.H, dims.I, generator=g) * dims.I**-0.5


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _share(n: int, rank: int, world: int) -> slice:
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (1 if rank < extra else 0))


def bench_parallel(
    spec: BenchLayer, bench, placement: Placement, group, log=print, backend: dict | None = None
) -> list[dict]:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    full, k = spec.dims, spec.top_k
    mine = placement.local(rank)
    local = Dims(E=len(mine), H=full.H, I=full.I)
    weights = [float_expert(full, e) for e in mine]
    w13, w2 = torch.stack([w[0] for w in weights]), torch.stack([w[1] for w in weights])
    del weights
    records = []
    variants = scheme_variants(full, bench.group_size)
    for key in selected_variants(bench, variants):
        label, overrides = variants[key]
        v = compose_variant(overrides)
        scheme, fmt = Scheme.from_config(v.scheme), Format.from_config(v.format)
        alpha = torch.ones(local.E) if scheme.clips else None
        tensors = quantize_experts(scheme, fmt, w13, w2, alpha=alpha, log=None)
        for mode in bench_modes(bench, backend):
            layer = MoELayer(scheme, fmt, get_backend(with_mode(backend, mode)), local, experts=mine)
            moe = ParallelMoE(layer.load(tensors, source=f"bench {label}"), placement, rank, 1, group)
            for T in bench.tokens:
                x = torch.randn(T, full.H, generator=torch.Generator().manual_seed(T)).to(torch.bfloat16)
                w, ids = uniform_routing(T, full.E, k, seed=T + 1)
                s = _share(T, rank, world)
                ts = time_ms(lambda f=moe, a=x[s], b=w[s], c=ids[s]: f(a, b, c), bench.repeats, float("inf"))
                per_rank: list = [None] * world
                dist.all_gather_object(
                    per_rank, (statistics.median(ts), min(ts), max(ts), peak_rss_mb()), group=group
                )
                rec = {
                    "kind": "forward_ep",
                    "layer": spec.name,
                    "E": full.E,
                    "H": full.H,
                    "I": full.I,
                    "top_k": k,
                    "scheme": label,
                    "mode": mode,
                    "tokens": T,
                    "ranks": world,
                    "median_ms": max(r[0] for r in per_rank),  # the slowest rank gates the layer
                    "min_ms": min(r[1] for r in per_rank),
                    "max_ms": max(r[2] for r in per_rank),
                    "repeats": len(ts),
                    "peak_rss_mb_per_rank": [round(r[3], 1) for r in per_rank],
                }
                records.append(rec)
                if rank == 0:
                    log(
                        f"{spec.name:<9} {label:<17} {mode:<5} T={T:<5} {world} ranks {rec['median_ms']:9.2f} ms "
                        f"(min {rec['min_ms']:.2f}), peak RSS/rank {max(rec['peak_rss_mb_per_rank']):.0f} MB"
                    )
    return records


def run_parallel_bench(cfg: DictConfig, layers: list[BenchLayer], group) -> dict:
    """Every bench layer on the expert-parallel layer over `group` (ep_size = world, tp_size 1)."""
    if cfg.tp_size != 1:
        raise ConfigError(
            f"bench under torchrun times expert parallelism only: tp_size={cfg.tp_size}, expected 1"
        )
    bench = cfg.bench
    if bench.threads:
        torch.set_num_threads(bench.threads)
    world = dist.get_world_size(group)
    records = []
    for spec in layers:
        declared = cfg.placement if spec.name == cfg.model.name else None
        if isinstance(declared, DictConfig | ListConfig):
            declared = OmegaConf.to_container(declared, resolve=True)
        placement = Placement.from_config(declared, spec.dims.E, world)
        log = print if dist.get_rank(group) == 0 else (lambda _msg: None)
        backend = OmegaConf.to_container(cfg.backend, resolve=True)
        records += bench_parallel(spec, bench, placement, group, log, backend)
    return {"machine": machine(), "bandwidth_gbs": None, "records": records}
