"""Latency of the generic MoE layer per scheme and backend mode, next to float baselines and the
memory roofline measured in the same run; load + post-load time vs a raw safetensors read.

Wall-clock medians (perf_counter) after one warm-up call. Weights are random (timing does not
depend on their values); routing is uniform random top-k.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from quantfw.backends import declared_modes, get_backend
from quantfw.config.paths import CONF_DIR
from quantfw.config.variants import compose_variant
from quantfw.eval.comparison import declared_rows
from quantfw.formats.format import Format
from quantfw.layout.spec import Dims
from quantfw.moe.layer import MoELayer
from quantfw.progress import bar
from quantfw.quantize.experts import quantize_experts
from quantfw.schemes.scheme import Scheme

KERNEL_GROUP_SIZES = (256, 128, 64)


def scheme_variants(
    dims: Dims, group_size: int = 256, recipe_label: str | None = None
) -> dict[str, tuple[str, list[str]]]:
    """Bench key -> (label, overrides), from conf/compare/rows.yaml's `bench` section (plus
    `recipe`: the running recipe unchanged, when recipe_label is given)."""
    ks = (dims.H, dims.I // dims.tp)
    gs = next((g for g in (group_size, *KERNEL_GROUP_SIZES) if all(k % g == 0 for k in ks)), 0)
    out = {}
    for key, row in (declared_rows("bench") or {}).items():
        flags = dict(row.get("flags") or {})
        if row.get("fit_group_size"):
            flags["group_size"] = gs
        overrides = [f"scheme={row['scheme']}", *(f"scheme.{k}={v}" for k, v in flags.items())]
        out[key] = (str(row.get("label", key)).format(**flags), [*overrides, f"format={row['format']}"])
    if recipe_label is not None:
        out["recipe"] = (recipe_label, [])
    return out


def selected_variants(bench, variants: Mapping[str, object]) -> list[str]:
    """bench.schemes, or every declared variant (the recipe's own only when asked for)."""
    return list(bench.schemes) or [k for k in variants if k != "recipe"]


def default_backend() -> dict:
    """conf/backend/torch.yaml, for callers that name no backend."""
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "backend" / "torch.yaml"))


def with_mode(backend: Mapping | None, mode: str) -> dict:
    return {**(backend or default_backend()), "mode": mode}


def time_ms(fn: Callable[[], object], repeats: int, max_seconds: float) -> list[float]:
    """One warm-up, then up to `repeats` timed calls, stopping early once max_seconds is spent."""
    start = time.perf_counter()
    fn()
    out: list[float] = []
    while len(out) < max(1, repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() - start > max_seconds:
            break
    return out


def measure_bandwidth(mb: int = 1024, repeats: int = 5) -> float:
    """Memory bandwidth in GB/s from a large tensor copy (read + write counted)."""
    n = mb * 2**20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    ts = time_ms(lambda: dst.copy_(src), repeats, 30.0)
    return 2 * n * 4 / (statistics.median(ts) / 1e3) / 1e9


def machine() -> dict:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and "cpu" not in locals():
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")
    return {
        "cpu": locals().get("cpu", platform.processor()),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": [w for w in wanted if f" {w} " in flags + " "],
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # other processes on the machine skew every number: recorded so a reader can tell
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


@dataclass
class BenchLayer:
    name: str
    dims: Dims
    top_k: int


def float_experts(dims: Dims, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(dims.E, 2 * dims.I, dims.H, generator=g) * dims.H**-0.5
    w2 = torch.randn(dims.E, dims.H, dims.I, generator=g) * dims.I**-0.5
    return w13, w2


def eager_moe(w13: torch.Tensor, w2: torch.Tensor) -> Callable:
    """Float baseline shaped like transformers' eager MoE block: a Python loop over hit experts."""
    I = w2.shape[2]

    @torch.no_grad()
    def forward(x, topk_w, topk_ids):
        out = torch.zeros_like(x)
        for e in torch.unique(topk_ids).tolist():
            tok, slot = torch.where(topk_ids == e)
            h = x[tok] @ w13[e].T
            y = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ w2[e].T
            out.index_add_(0, tok, y * topk_w[tok, slot, None].to(x.dtype))
        return out

    return forward


def uniform_routing(T: int, E: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
    w = torch.rand(T, k, generator=g)
    return w / w.sum(-1, keepdim=True), ids


def runtime_bytes_per_expert(layer: MoELayer) -> int:
    return sum(t.numel() * t.element_size() for t in layer.runtime_tensors().values()) // layer.dims.E


def bench_layer(
    layer_spec: BenchLayer,
    bench,
    bandwidth: float,
    log: Callable[[str], None] = print,
    backend: Mapping | None = None,
    recipe_label: str | None = None,
) -> list[dict]:
    """backend: the recipe's backend node (default conf/backend/torch.yaml), timed in each of
    bench.modes; recipe_label: also time the running recipe as variant `recipe`."""
    dims, k = layer_spec.dims, layer_spec.top_k
    w13, w2 = float_experts(dims)
    records: list[dict] = []
    inputs = {}
    for T in bench.tokens:
        x = torch.randn(T, dims.H, generator=torch.Generator().manual_seed(T))
        w, ids = uniform_routing(T, dims.E, k, seed=T + 1)
        inputs[T] = (x, w, ids, len(torch.unique(ids)))
    base: dict[tuple[str, int], float] = {}
    float_bytes = {"bf16": 2, "fp32": 4}
    for fname, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        fwd = eager_moe(w13.to(dtype), w2.to(dtype))
        for T, (x, w, ids, active) in inputs.items():
            xd = x.to(dtype)
            ts = time_ms(lambda f=fwd, a=xd, b=w, c=ids: f(a, b, c), bench.repeats, bench.max_seconds)
            nbytes = active * 3 * dims.H * dims.I * float_bytes[fname]
            base[(fname, T)] = statistics.median(ts)
            records.append(
                _record(layer_spec, f"{fname}_eager", "float", T, ts, None, None, nbytes, bandwidth)
            )
            log(_line(records[-1]))
    variants = scheme_variants(dims, bench.group_size, recipe_label)
    for key in selected_variants(bench, variants):
        label, overrides = variants[key]
        v = compose_variant(overrides)
        scheme, fmt = Scheme.from_config(v.scheme), Format.from_config(v.format)
        alpha = torch.ones(dims.E) if scheme.clips else None
        tensors = quantize_experts(scheme, fmt, w13, w2, alpha=alpha)
        for mode in bench_modes(bench, backend):
            layer = MoELayer(scheme, fmt, get_backend(with_mode(backend, mode)), dims)
            layer.load(tensors, source=f"bench {label}")
            per_expert = runtime_bytes_per_expert(layer)
            for T, (x, w, ids, active) in inputs.items():
                xb = x.to(torch.bfloat16)
                ts = time_ms(lambda f=layer, a=xb, b=w, c=ids: f(a, b, c), bench.repeats, bench.max_seconds)
                rec = _record(
                    layer_spec,
                    label,
                    mode,
                    T,
                    ts,
                    base[("bf16", T)],
                    base[("fp32", T)],
                    active * per_expert,
                    bandwidth,
                )
                records.append(rec)
                log(_line(rec))
    return records


def _record(spec, scheme, mode, T, ts, bf16_ms, fp32_ms, nbytes, bandwidth) -> dict:
    med = statistics.median(ts)
    rec = {
        "kind": "forward",
        "layer": spec.name,
        "E": spec.dims.E,
        "H": spec.dims.H,
        "I": spec.dims.I,
        "top_k": spec.top_k,
        "scheme": scheme,
        "mode": mode,
        "tokens": T,
        "median_ms": med,
        "min_ms": min(ts),
        "max_ms": max(ts),
        "repeats": len(ts),
        "bytes": nbytes,  # weights of the experts this batch hits, in the layout the kernels read
        "roofline_ms": nbytes / (bandwidth * 1e9) * 1e3,
    }
    if bf16_ms is not None:
        rec.update(
            baseline="bf16_eager",
            baseline_ms=bf16_ms,
            speedup_vs_bf16=bf16_ms / med,
            fp32_baseline_ms=fp32_ms,
            speedup_vs_fp32=fp32_ms / med,
        )
    return rec


def _line(r: dict) -> str:
    extra = f" x{r['speedup_vs_bf16']:.2f} vs bf16" if "baseline_ms" in r else ""
    return (
        f"{r['layer']:<9} {r['scheme']:<17} {r['mode']:<5} T={r['tokens']:<5} "
        f"{r['median_ms']:9.2f} ms (min {r['min_ms']:.2f})  roofline {r['roofline_ms']:7.2f} ms{extra}"
    )


def bench_modes(bench, backend: Mapping | None) -> list[str]:
    """bench.modes, or every mode the backend declares."""
    return list(bench.modes) or list(declared_modes(backend or default_backend()))


def bench_load(
    layer_spec: BenchLayer,
    bench,
    log: Callable[[str], None] = print,
    backend: Mapping | None = None,
    recipe_label: str | None = None,
) -> list[dict]:
    """load_file + a copy of every tensor (the raw read) vs load_file + MoELayer.load (format steps
    + backend post-load), on a file written by quantize_experts (in the page cache for both)."""
    from safetensors.torch import load_file, save_file

    dims = layer_spec.dims
    w13, w2 = float_experts(dims)
    records = []
    variants = scheme_variants(dims, bench.group_size, recipe_label)
    with tempfile.TemporaryDirectory(prefix="quantfw-bench-") as tmp:
        for key in selected_variants(bench, variants):
            label, overrides = variants[key]
            v = compose_variant(overrides)
            scheme, fmt = Scheme.from_config(v.scheme), Format.from_config(v.format)
            alpha = torch.ones(dims.E) if scheme.clips else None
            path = os.path.join(tmp, f"{key}.safetensors")
            save_file(
                {n: t.contiguous() for n, t in quantize_experts(scheme, fmt, w13, w2, alpha).items()}, path
            )
            nbytes = os.path.getsize(path)
            # load_file maps the file lazily: copy every tensor so the raw read really reads the bytes
            raw = time_ms(
                lambda p=path: {n: t.clone() for n, t in load_file(p).items()},
                bench.repeats,
                bench.max_seconds,
            )
            for mode in bench_modes(bench, backend):
                built = get_backend(with_mode(backend, mode))

                def full(p=path, b=built, s=scheme, f=fmt):
                    MoELayer(s, f, b, dims).load(load_file(p), source=p)

                ts = time_ms(full, bench.repeats, bench.max_seconds)
                rec = {
                    "kind": "load",
                    "layer": layer_spec.name,
                    "scheme": label,
                    "mode": mode,
                    "bytes": nbytes,
                    "raw_read_ms": statistics.median(raw),
                    "median_ms": statistics.median(ts),
                    "min_ms": min(ts),
                    "max_ms": max(ts),
                    "ratio_vs_raw": statistics.median(ts) / statistics.median(raw),
                }
                records.append(rec)
                log(
                    f"load {layer_spec.name:<9} {label:<17} {mode:<5} {nbytes / 2**20:8.1f} MiB: raw "
                    f"{rec['raw_read_ms']:8.1f} ms, load+post-load {rec['median_ms']:8.1f} ms "
                    f"(x{rec['ratio_vs_raw']:.2f})"
                )
    return records


def run_bench(
    layers: Sequence[BenchLayer],
    bench,
    log: Callable[[str], None] = print,
    progress: bool = True,
    backend: Mapping | None = None,
    recipe_label: str | None = None,
) -> dict:
    if bench.threads:
        torch.set_num_threads(bench.threads)
    bandwidth = measure_bandwidth(bench.copy_mb)
    log(f"memory bandwidth (copy of {bench.copy_mb} MiB): {bandwidth:.1f} GB/s")
    records = []
    for spec in bar(layers, progress=progress, desc="bench", unit="layer"):
        records += bench_layer(spec, bench, bandwidth, log, backend, recipe_label)
        if bench.load:
            records += bench_load(spec, bench, log, backend, recipe_label)
    name = (backend or default_backend())["name"]
    return {"machine": machine(), "bandwidth_gbs": bandwidth, "backend": name, "records": records}


def markdown_table(result: dict) -> str:
    """The forward records as a markdown table (docs/performance.md is rendered from this)."""
    rows = [
        "| layer | scheme | mode | tokens | median ms | min-max ms | vs bf16 eager | vs fp32 eager "
        "| roofline ms | x roofline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        if r["kind"] != "forward":
            continue
        vs = (
            (f"{r['speedup_vs_bf16']:.2f}x", f"{r['speedup_vs_fp32']:.2f}x")
            if "baseline_ms" in r
            else ("", "")
        )
        rows.append(
            f"| {r['layer']} | {r['scheme']} | {r['mode']} | {r['tokens']} | {r['median_ms']:.1f} "
            f"| {r['min_ms']:.1f}-{r['max_ms']:.1f} | {vs[0]} | {vs[1]} | {r['roofline_ms']:.2f} "
            f"| {r['median_ms'] / r['roofline_ms']:.1f} |"
        )
    loads = [r for r in result["records"] if r["kind"] == "load"]
    if loads:
        rows += [
            "",
            "| layer | scheme | mode | MiB | raw read ms | load + post-load ms | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in loads:
            rows.append(
                f"| {r['layer']} | {r['scheme']} | {r['mode']} | {r['bytes'] / 2**20:.1f} | {r['raw_read_ms']:.1f} "
                f"| {r['median_ms']:.1f} | {r['ratio_vs_raw']:.2f} |"
            )
    return "\n".join(rows)
