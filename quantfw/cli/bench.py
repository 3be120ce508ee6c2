"""`quantfw bench [bench.tokens=[1,16]] [bench.modes=[fast]] [bench.schemes=[recipe]] out=FILE.json`.

Times the reference layer (bench.reference) and the recipe's model layer (this rank's experts:
use ep_size to shrink a large model) on the recipe's backend, in each of bench.modes (default:
every mode the backend declares), for the variants of conf/compare/rows.yaml `bench` and
`recipe` (the running recipe's scheme and format). The JSON holds the machine, the measured bandwidth and one
record per point; an existing file's records are kept and the new ones appended (so a --multirun
sweep fills one file), unless overwrite=true.
"""

from __future__ import annotations

import json
import os

from omegaconf import DictConfig, OmegaConf

from quantfw.api import layer_dims
from quantfw.backends import declared_modes
from quantfw.errors import ConfigError
from quantfw.eval.bench import BenchLayer, markdown_table, run_bench, scheme_variants
from quantfw.layout.spec import Dims

KEYS = ("kind", "layer", "scheme", "mode", "tokens", "median_ms", "min_ms", "max_ms", "bytes")


def _layers(cfg: DictConfig) -> list[BenchLayer]:
    out = []
    for name in cfg.bench.layers:
        if name == "reference":
            r = cfg.bench.reference
            dims = Dims(E=r.num_experts, H=r.hidden_size, I=r.moe_intermediate_size)
            out.append(BenchLayer("reference", dims, r.top_k))
        elif name == "model":
            out.append(BenchLayer(cfg.model.name, layer_dims(cfg), cfg.model.top_k))
        else:
            raise ConfigError(f"bench.layers: unknown layer '{name}' (allowed: reference, model)")
    return out


def _recipe_label(cfg: DictConfig) -> str:
    return f"{cfg.scheme.name} [{cfg.format.name}] (recipe)"


def _check(cfg: DictConfig, backend: dict) -> None:
    known = scheme_variants(Dims(E=1, H=256, I=256), recipe_label="").keys()
    bad = [s for s in cfg.bench.schemes if s not in known]
    if bad:
        raise ConfigError(f"bench.schemes: unknown {bad} (allowed: {', '.join(known)})")
    modes = declared_modes(backend)
    bad = [m for m in cfg.bench.modes if m not in modes]
    if bad:
        raise ConfigError(
            f"bench.modes: unknown {bad} for backend '{backend['name']}' (allowed: {', '.join(modes)})"
        )


def run(cfg: DictConfig) -> dict:
    backend = OmegaConf.to_container(cfg.backend, resolve=True)
    _check(cfg, backend)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _run_parallel(cfg)
    result = run_bench(
        _layers(cfg), cfg.bench, progress=cfg.progress, backend=backend, recipe_label=_recipe_label(cfg)
    )
    print(markdown_table(result))
    return _write(cfg, result)


def _write(cfg: DictConfig, result: dict) -> dict:
    if cfg.out:
        previous = []
        if os.path.exists(cfg.out) and not cfg.overwrite:
            try:
                with open(cfg.out) as f:
                    previous = json.load(f)["records"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(
                    f"out={cfg.out}: exists but is not a quantfw bench JSON ({e}); use overwrite=true"
                ) from None
        result = {**result, "records": previous + result["records"]}
        tmp = f"{cfg.out}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, cfg.out)  # never a half-written file under the final name
        print(f"wrote {len(result['records'])} records to {cfg.out}")
    return result


def _run_parallel(cfg: DictConfig) -> dict:
    """`torchrun --nproc-per-node P -m quantfw bench ...`: the expert-parallel layer over the P*nodes
    ranks (whole layers: every expert of the model / reference layer, placed by `placement`)."""
    import torch.distributed as dist

    from quantfw.eval.parallel_bench import run_parallel_bench
    from quantfw.moe.parallel import init_world

    full = []
    for spec in _layers(cfg):
        d = spec.dims
        E = cfg.model.num_experts if spec.name == cfg.model.name else d.E
        full.append(BenchLayer(spec.name, Dims(E=E, H=d.H, I=d.I), spec.top_k))
    created = init_world()
    try:
        result = run_parallel_bench(cfg, full, dist.group.WORLD)
        return _write(cfg, result) if dist.get_rank() == 0 else result
    finally:
        if created:
            dist.destroy_process_group()
