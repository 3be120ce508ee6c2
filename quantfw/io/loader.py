"""Quantized checkpoint -> generic MoE layer (spec section 6), and the conformance check.

The scheme and format are detected from the checkpoint's metadata (quantfw.io.metadata) and
composed as a recipe would (overrides win). One expert projection's tensors are checked against
the format's declared disk layout; then this rank's experts are read, sliced for tensor
parallelism as each tensor's `shard` declaration says, gate/up concatenated into w13, stacked
and handed to `MoELayer.load`, which runs the declared post-load pipeline.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from quantfw.errors import CheckpointError
from quantfw.formats.format import Format
from quantfw.io import metadata
from quantfw.io.experts import (
    PROJS,
    MoEModel,
    expert_prefixes,
    key_of,
    layer_ranges,
    parse_expert_key,
    projection_specs,
)
from quantfw.io.reader import CheckpointReader
from quantfw.layout.spec import ParamSpec, conformance_problems
from quantfw.schemes.scheme import FILL_OPTION, Scheme


@dataclass
class Opened:
    """A quantized checkpoint with its detected recipe: reader, model dims, scheme, format, cfg."""

    reader: CheckpointReader
    model: MoEModel
    prefixes: dict[int, str]  # MoE layer -> expert-block key prefix
    cfg: DictConfig
    scheme: Scheme
    fmt: Format
    # Per-layer scheme choices: layer -> recipe overrides of the layers whose detected scheme
    # differs from the first MoE layer's (that layer's own composition is `at(layer)`).
    layer_overrides: dict[int, list[str]] = field(default_factory=dict)
    recipe: str = "default"
    config_dirs: tuple = ()  # the user recipe folders the recipe came from (--config-dir)
    _at: dict[int, Opened] = field(default_factory=dict, repr=False)

    def at(self, layer: int) -> Opened:
        """This checkpoint as MoE layer `layer` was written: its own scheme when a per-layer choice
        gave it one, else self."""
        if layer not in self.layer_overrides:
            return self
        if layer not in self._at:
            from quantfw.config.compose import compose

            cfg = compose(self.recipe, self.layer_overrides[layer], config_dirs=self.config_dirs)
            self._at[layer] = replace(
                self,
                cfg=cfg,
                scheme=Scheme.from_config(cfg.scheme),
                fmt=Format.from_config(cfg.format),
                layer_overrides={},
                _at={},
            )
        return self._at[layer]

    def schemes(self) -> dict[int, str]:
        """MoE layer -> the scheme name its experts were written with."""
        return {layer: self.at(layer).scheme.name for layer in self.prefixes}

    def layer_index(self, layer: int) -> int:
        if layer < 0:
            return next(iter(self.prefixes))
        if layer not in self.prefixes:
            raise CheckpointError(
                f"{self.reader.folder}: layer {layer} has no routed experts (MoE layers: {list(self.prefixes)})"
            )
        return layer


def open_checkpoint(
    path: str | Path,
    recipe: str = "default",
    recipe_overrides: Sequence[str] = (),
    ep_rank: int = 0,
    ep_size: int = 1,
    tp_rank: int = 0,
    tp_size: int = 1,
    backend: str | None = None,
    proj_names=None,
    collect: bool = False,
    layer_plan: Callable[[dict], list[str]] | None = None,
    config_dirs: Sequence[str | Path] = (),
) -> Opened:
    """The checkpoint with its detected recipe. Dims from config.json are typed, bounded and
    checked against the tensor headers before anything is sized from them. `collect=True` keeps
    index/shard inconsistencies in `reader.problems` for `check` instead of raising.
    Each MoE layer's scheme is detected on its own (per-layer choices, config/layer_choice.py);
    `layer_plan(flags)` adds overrides per layer from its detected scheme flags (an engine's plan).
    `config_dirs`: the user recipe folders (--config-dir) the recipe and its groups may come from."""
    from quantfw.config.compose import compose

    if not (0 <= ep_rank < ep_size and 0 <= tp_rank < tp_size):
        raise CheckpointError(
            f"ep_rank={ep_rank}/ep_size={ep_size}, tp_rank={tp_rank}/tp_size={tp_size}: rank out of range"
        )
    reader = CheckpointReader(path, collect=collect)
    model = MoEModel.from_reader(reader, proj_names)
    prefixes = expert_prefixes(reader.keys(), model)
    if not prefixes:
        raise CheckpointError(
            f"{reader.folder}: no routed-expert tensors found (expected keys like "
            f"model.layers.L.mlp.experts.e.{model.proj_names['gate']}.weight)"
        )
    experts: dict[int, list[str]] = {}
    for k in reader.keys():
        p = parse_expert_key(k, model)
        if p:
            experts.setdefault(p[1], []).append(k)

    def probe_of(prefix: str, layer: int) -> metadata.Probe:
        return metadata.Probe(
            lambda proj, suffix: key_of(prefix, 0, model, proj, suffix), experts.get(layer, []), PROJS[0]
        )

    detected = {layer: metadata.detect(reader, probe_of(prefix, layer)) for layer, prefix in prefixes.items()}
    dims = [
        f"model.hidden_size={model.hidden_size}",
        f"model.moe_intermediate_size={model.moe_intermediate_size}",
        f"model.num_experts={model.num_experts}",
        f"ep_rank={ep_rank}",
        f"ep_size={ep_size}",
        f"tp_rank={tp_rank}",
        f"tp_size={tp_size}",
        f"checkpoint={reader.folder}",
    ]
    extra = [*dims, *([f"backend={backend}"] if backend else []), *recipe_overrides]

    def overrides(found: list[str]) -> list[str]:
        if layer_plan is None:
            return [*found, *extra]
        return [*found, *extra, *layer_plan(dict(compose(recipe, [*found, *extra], config_dirs=config_dirs).scheme))]

    first = next(iter(detected.values()))
    cfg = compose(recipe, overrides(first), config_dirs=config_dirs)
    per_layer = {layer: overrides(found) for layer, found in detected.items() if found != first}
    return Opened(
        reader,
        model,
        prefixes,
        cfg,
        Scheme.from_config(cfg.scheme),
        Format.from_config(cfg.format),
        per_layer,
        recipe,
        tuple(config_dirs),
    )


def layer_problems(
    op: Opened, layer: int, experts: Iterable[int], skip: set[str] = frozenset(), unexpected: bool = True
) -> list[str]:
    """Every missing / unexpected / wrong-shape / wrong-dtype expert tensor of one layer.

    The loader passes unexpected=False: it reads only what the scheme declares, so a clip
    checkpoint loads with its optional parameters switched off (unused: an A/B switch)."""
    prefix = op.prefixes[layer]
    specs = projection_specs(op.fmt, op.scheme, op.model.dims())
    problems: list[str] = []
    expected: set[str] = set()
    for e in experts:
        for proj in PROJS:
            for suffix, spec in specs[proj].items():
                key = key_of(prefix, e, op.model, proj, suffix)
                expected.add(key)
                if suffix in skip:
                    continue
                entry = f"{op.fmt.where} tensors.{suffix} ({proj})"
                named = {key: ParamSpec(key, spec.role, spec.shape, spec.dtype, meta=spec.meta)}
                found = {key: _accepting_scalar(op.reader.info(key), spec.shape)} if key in op.reader else {}
                problems += conformance_problems(named, found, entry)
    experts = set(experts)
    for key in op.reader.keys() if unexpected else ():
        p = parse_expert_key(key, op.model)
        if p and p[1] == layer and p[0] != prefix:
            problems.append(f"unexpected {key} (layer {layer}'s routed experts are under {prefix})")
        elif p and p[0] == prefix and p[2] in experts and key not in expected:
            problems.append(
                f"unexpected {key} (not declared by {op.fmt.where} for scheme '{op.scheme.name}')"
            )
        elif p and p[0] == prefix and not 0 <= p[2] < op.model.num_experts:
            problems.append(
                f"unexpected {key} (expert {p[2]} >= config.json's {op.model.num_experts} experts)"
            )
    return problems


def _accepting_scalar(info, shape):
    """A declared scalar may be stored as [1] (spec section 9, alpha)."""
    if shape == () and tuple(info.shape) == (1,):
        return type(info)((), info.dtype, info.shard)
    return info


def value_problems(op: Opened, key: str, t: torch.Tensor, expert: int) -> list[str]:
    """Why a tensor's values are out of the range its scheme declares (empty = fine or no range)."""
    suffix = key.rsplit(".", 1)[-1]
    ranges = op.scheme.value_ranges()
    if suffix not in ranges:
        return []
    lo, hi, why = ranges[suffix]
    v = t.detach().float().reshape(-1)
    bad = ~(torch.isfinite(v) & (v > lo) & (v <= hi))
    if not bool(bad.any()):
        return []
    first = float(v[bad][0])
    return [f"{key} (expert {expert}) = {first}: {suffix} must be finite and in ({lo:g}, {hi:g}] ({why})"]


def _ranged_keys(op: Opened, layer: int, experts: Iterable[int]) -> dict[str, int]:
    """key -> expert of this layer's present tensors that have a declared value range (scalars:
    a wrong-shape one is reported by layer_problems, never read whole)."""
    out = {}
    for e in experts:
        for proj in PROJS:
            for suffix in op.scheme.value_ranges():
                key = key_of(op.prefixes[layer], e, op.model, proj, suffix)
                if key in op.reader and math.prod(op.reader.info(key).shape) <= 1:
                    out[key] = e
    return out


def check(op: Opened) -> list[str]:
    """The conformance report of the whole checkpoint (empty = conforming): index/shard
    inconsistencies, MoE layers config.json promises but the tensors lack, every layer's
    missing/unexpected/wrong tensors, and out-of-range values (the scheme's declared `values`)."""
    out = list(op.reader.problems)
    config = op.reader.config()
    by_config = op.model.moe_layers(config, str(op.reader.folder / "config.json"))
    if by_config is not None:
        required, optional = by_config
        said = layer_ranges(required) + (f" (+ optional {layer_ranges(optional)})" if optional else "")
        for layer in required:
            if layer not in op.prefixes:
                out.append(f"layer {layer}: no routed-expert tensors (config.json makes layers {said} MoE)")
        for layer in op.prefixes:
            if layer not in required and layer not in optional:
                out.append(
                    f"layer {layer}: has routed-expert tensors but config.json makes layers {said} MoE"
                )
    E = op.model.num_experts
    for layer in op.prefixes:
        out += layer_problems(op.at(layer), layer, range(E))
        ranged = _ranged_keys(op.at(layer), layer, range(E))
        values = op.reader.read_many(list(ranged))
        for key, e in ranged.items():
            out += value_problems(op, key, values[key], e)
    return out


def _slice(t: torch.Tensor, kind: str, rank: int, tp: int, key: str, entry: str, doc: str) -> torch.Tensor:
    if tp == 1 or kind == "replicate":
        return t
    if kind == "cols" and t.shape[-1] == 1:
        return t  # one column (a per-channel scale, or one group spanning K) holds for every K slice
    if kind == "refuse":
        raise CheckpointError(
            f"{key}: {doc or entry + ' is declared shard: refuse'}; tp_size>1 cannot load it (use expert parallelism)"
        )
    dim = 0 if kind == "rows" else t.dim() - 1
    n = t.shape[dim]
    if n % tp:
        raise CheckpointError(
            f"{key}: {entry} has {n} {kind} that do not split into tp_size={tp} equal parts (packed int4 needs whole byte pairs)"
        )
    return t.narrow(dim, rank * (n // tp), n // tp)


def _rank_experts(cfg: DictConfig) -> tuple[int, ...]:
    """The experts this rank reads: the recipe's placement (contiguous blocks by default)."""
    from quantfw.build import local_experts

    return local_experts(cfg)


def layer_tensors(op: Opened, layer: int) -> dict[str, torch.Tensor]:
    """This rank's expert-stacked tensors in the format's loaded layout (`{role}_{suffix}`)."""
    cfg = op.cfg
    tp, tp_rank = cfg.tp_size, cfg.tp_rank
    experts = _rank_experts(cfg)
    specs = projection_specs(op.fmt, op.scheme, op.model.dims())
    prefix = op.prefixes[layer]
    # Optional parameters in use that no expert of this rank stores: filled at their `init` when
    # the scheme's load option says so, else an error naming the option.
    optional = op.scheme.optional_in_use()
    missing = {
        name: [p for p in PROJS if name in specs[p]]
        for name in optional
        if not any(
            key_of(prefix, e, op.model, p, name) in op.reader
            for e in experts
            for p in PROJS
            if name in specs[p]
        )
    }
    missing = {name: projs for name, projs in missing.items() if projs}
    fill = set(missing) if op.scheme.fills_missing() else set()
    problems = layer_problems(op, layer, experts, skip=fill, unexpected=False)
    if problems:
        hint = f"scheme '{op.scheme.name}' needs {', '.join(missing)} (or scheme.{FILL_OPTION}=ones)"
        raise CheckpointError(
            f"{op.reader.folder} layer {layer}: {len(problems)} problem(s): "
            + "; ".join(problems)
            + (f"; {hint}" if missing else "")
        )
    for name in fill:
        stored = ", ".join(f"{op.model.proj_names[p]}.{name}" for p in missing[name])
        warnings.warn(
            f"{op.reader.folder} layer {layer}: no {stored}; scheme.{FILL_OPTION}=ones loads "
            f"{name} = {optional[name].init_value} (no clip)",
            stacklevel=3,
        )
    keys = [
        key_of(prefix, e, op.model, p, s) for e in experts for p in PROJS for s in specs[p] if s not in fill
    ]
    raw = op.reader.read_many(keys)
    for key, e in _ranged_keys(op, layer, experts).items():
        bad = value_problems(op, key, raw[key], e) if key in raw else []
        if bad:
            raise CheckpointError(f"{op.reader.folder / op.reader.shard_of(key)}: {bad[0]}")
    per_role: dict[str, list[torch.Tensor]] = {}
    for suffix in specs["down"].keys() | specs["gate"].keys():
        for role, projs in (("w13", ("gate", "up")), ("w2", ("down",))):
            if suffix not in specs[projs[0]]:
                continue
            spec = specs[projs[0]][suffix]
            entry = f"{op.fmt.where} tensors.{suffix}"
            stacked = []
            for e in experts:
                parts = []
                for p in projs:
                    if suffix in fill:
                        parts.append(getattr(torch, optional[suffix].init)(spec.shape, dtype=spec.dtype))
                        continue
                    key = key_of(prefix, e, op.model, p, suffix)
                    parts.append(
                        _slice(
                            raw[key].reshape(spec.shape) if spec.shape == () else raw[key],
                            spec.meta.get("shard", "replicate"),
                            tp_rank,
                            tp,
                            key,
                            entry,
                            spec.meta.get("doc", ""),
                        )
                    )
                if len(parts) > 1 and spec.meta.get("shard") == "replicate":
                    parts = parts[:1]  # per-projection metadata, not a half of w13 (io/experts.py)
                stacked.append(torch.cat(parts, 0) if len(parts) > 1 else parts[0])
            per_role[f"{role}_{suffix}"] = torch.stack(stacked)
    return per_role


def from_checkpoint(
    path: str | Path,
    layer: int = -1,
    backend: str = "torch",
    ep_rank: int = 0,
    ep_size: int = 1,
    tp_rank: int = 0,
    tp_size: int = 1,
    recipe_overrides: Sequence[str] | None = None,
    recipe: str = "default",
):
    """The loaded generic MoE layer of MoE layer `layer` (-1: the first) for this EP/TP rank."""
    op = open_checkpoint(path, recipe, recipe_overrides or (), ep_rank, ep_size, tp_rank, tp_size, backend)
    return load_layer(op, op.layer_index(layer))


def load_layer(op: Opened, layer: int):
    from quantfw.build import build_layer

    op = op.at(layer)
    moe = build_layer(op.cfg)
    return moe.load(layer_tensors(op, layer), source=f"{op.reader.folder} layer {layer}")
