"""Routed experts on disk: model dims from config.json, per-expert key naming (spec section 6),
and the per-projection tensor layout a format declares.

A format declares tensors per role (w13 = [gate rows; up rows], w2 = down). On disk each expert
has three projections with their own keys; gate and up each hold the first / second half of the
w13 rows, in each tensor's own row units (packed int4: I/2 of I packed rows). So the per-projection
layout of gate and up is the w13 layout with dim 0 halved; this is the one place that rule lives.
A w13 entry declared `shard: replicate` is per-projection metadata: gate and up each hold the
full declared shape and the loader keeps gate's copy.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from quantfw.errors import CheckpointError
from quantfw.formats.format import Format
from quantfw.io.fields import Fields
from quantfw.layout import expr
from quantfw.layout.spec import DTYPES, Dims, ParamSpec, per_role
from quantfw.schemes.scheme import Scheme

PROJS = ("gate", "up", "down")
ROLE_OF = {"gate": "w13", "up": "w13", "down": "w2"}
DEFAULT_PROJ_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
# Model types whose on-disk per-expert names differ from the default (transformers 5 save_pretrained).
PROJ_NAMES_BY_TYPE = {"mixtral": {"gate": "w1", "up": "w3", "down": "w2"}}
# `...layers.L.<block>.experts.e.<proj>.<suffix>`; `shared_experts` does not match (no `.experts`).
EXPERT_RE = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:.*\.)?experts)\.(?P<expert>\d+)\.(?P<proj>[^.]+)\.(?P<suffix>.+)$"
)
# transformers-5 in-memory fused experts: `...experts.gate_up_proj` [E, 2I, H], `...experts.down_proj` [E, H, I].
FUSED_RE = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:.*\.)?experts)\.(?P<proj>gate_up_proj|down_proj)(?:\.weight)?$"
)


# Upper bounds of config.json dims, far above every released model (spec section 10: E <= 384,
# H <= 16384, I <= 53248): a typo or a hostile config must not become a huge allocation.
LIMITS = {"experts": 1 << 16, "hidden": 1 << 18, "intermediate": 1 << 20, "layers": 1 << 14}
# Model types whose config.json says which decoder layers are MoE through the fields read by
# `moe_layers` (first_k_dense_replace, moe_layer_freq, decoder_sparse_step, mlp_only_layers).
MOE_LAYER_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "kimi_k2")


@dataclass(frozen=True)
class MoEModel:
    """What the quantizer and loader need from config.json."""

    model_type: str
    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    proj_names: Mapping[str, str]
    num_layers: int | None = None
    # which config.json key gave each dim (for messages)
    keys: Mapping[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str, proj_names: Mapping[str, str] | None = None):
        """Dims typed and bounded (positive ints, not booleans); the first key present is used."""
        cfg = Fields(config, where)
        mtype = cfg.string("model_type", default="")
        keys = {}

        def first(dim, limit, *names):
            for k in names:
                if k in cfg:
                    keys[dim] = k
                    return cfg.integer(k, 1, LIMITS[limit])
            raise CheckpointError(f"{where}: none of {', '.join(names)} found (needed for the MoE dims)")

        inter = (
            ("intermediate_size",) if mtype == "mixtral" else ("moe_intermediate_size", "intermediate_size")
        )
        names = PROJ_NAMES_BY_TYPE.get(mtype) or dict(proj_names or DEFAULT_PROJ_NAMES)
        return cls(
            model_type=mtype,
            hidden_size=first("hidden_size", "hidden", "hidden_size"),
            moe_intermediate_size=first("moe_intermediate_size", "intermediate", *inter),
            num_experts=first(
                "num_experts", "experts", "n_routed_experts", "num_local_experts", "num_experts"
            ),
            proj_names=names,
            num_layers=cfg.integer("num_hidden_layers", 1, LIMITS["layers"], default=None),
            keys=keys,
        )

    @classmethod
    def from_reader(cls, reader, proj_names: Mapping[str, str] | None = None) -> MoEModel:
        """`from_config` of the folder's config.json, checked against the tensor headers (no
        tensor is read): the expert count and every float expert weight's shape must agree."""
        where = str(reader.folder / "config.json")
        model = cls.from_config(reader.config(), where, proj_names)
        model._check_tensors(reader, where)
        return model

    def _check_tensors(self, reader, where: str) -> None:
        E, H, I = self.num_experts, self.hidden_size, self.moe_intermediate_size
        top, top_key = -1, None
        for key in reader.keys():
            info = reader.info(key)
            p = parse_expert_key(key, self)
            fused = FUSED_RE.match(key)
            if p:
                if p[2] > top:
                    top, top_key = p[2], key
                want = self.float_shape(p[3]) if p[4] == "weight" else None
            elif fused and len(info.shape) == 3:
                if info.shape[0] - 1 > top:
                    top, top_key = info.shape[0] - 1, key
                want = (E, 2 * I, H) if fused["proj"] == "gate_up_proj" else (E, H, I)
            else:
                continue
            if want is not None and info.dtype.is_floating_point and tuple(info.shape) != want:
                raise CheckpointError(
                    f"{where}: {self.keys.get('hidden_size')}={H}, {self.keys.get('moe_intermediate_size')}={I} "
                    f"disagree with '{key}' {list(info.shape)} (expected {list(want)})"
                )
        if top_key is not None and top + 1 != E:
            raise CheckpointError(
                f"{where}: {self.keys.get('num_experts')}={E} disagrees with the tensors "
                f"(routed experts 0..{top} found, e.g. '{top_key}')"
            )

    def moe_layers(self, config: Mapping[str, Any], where: str) -> tuple[list[int], list[int]] | None:
        """(required, optional) MoE layers by config.json, None when this model type is not known.
        Optional: DeepSeek's multi-token-prediction layers (num_nextn_predict_layers) after the
        decoder layers, in released checkpoints but dropped by transformers' save_pretrained."""
        if self.model_type not in MOE_LAYER_TYPES or self.num_layers is None:
            return None
        cfg, n = Fields(config, where), self.num_layers
        first = cfg.integer("first_k_dense_replace", 0, n, default=0)
        freq = cfg.integer("moe_layer_freq", 1, n, default=1)
        step = cfg.integer("decoder_sparse_step", 1, n, default=1)
        nextn = cfg.integer("num_nextn_predict_layers", 0, 64, default=0)
        dense = cfg.raw("mlp_only_layers", [])
        if not isinstance(dense, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in dense
        ):
            raise cfg.fail("mlp_only_layers", "an array of layer indices", dense)
        decoder = [
            layer
            for layer in range(n)
            if layer >= first and layer % freq == 0 and (layer + 1) % step == 0 and layer not in dense
        ]
        return decoder, list(range(n, n + nextn))

    def dims(self, ep_size: int = 1, tp: int = 1) -> Dims:
        if ep_size < 1 or tp < 1:
            raise CheckpointError(f"ep_size={ep_size}, tp_size={tp}: both must be >= 1")
        if self.num_experts % ep_size:
            raise CheckpointError(f"{self.num_experts} routed experts are not divisible by ep_size={ep_size}")
        return Dims(E=self.num_experts // ep_size, H=self.hidden_size, I=self.moe_intermediate_size, tp=tp)

    def proj_of(self, name: str) -> str | None:
        return next((p for p, n in self.proj_names.items() if n == name), None)

    def float_shape(self, proj: str) -> tuple[int, int]:
        H, I = self.hidden_size, self.moe_intermediate_size
        return (H, I) if proj == "down" else (I, H)


def layer_ranges(layers: list[int]) -> str:
    """[0, 1] or [3..60]: runs of three or more consecutive layers collapsed."""
    runs: list[list[int]] = []
    for x in layers:
        if runs and x == runs[-1][-1] + 1:
            runs[-1].append(x)
        else:
            runs.append([x])
    parts = [f"{r[0]}..{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs]
    return "[" + ", ".join(parts) + "]"


def parse_expert_key(key: str, model: MoEModel):
    """(prefix, layer, expert, proj, suffix) of a routed-expert key, else None."""
    m = EXPERT_RE.match(key)
    if not m:
        return None
    proj = model.proj_of(m["proj"])
    if proj is None:
        return None
    return m["prefix"], int(m["layer"]), int(m["expert"]), proj, m["suffix"]


def expert_prefixes(keys, model: MoEModel) -> dict[int, str]:
    """layer -> the expert-block prefix (`model.layers.L.mlp.experts`) found among the keys; the
    one holding most tensors when a layer has several (the others are reported by check)."""
    counts: dict[int, Counter] = {}
    for k in keys:
        p = parse_expert_key(k, model)
        if p:
            counts.setdefault(p[1], Counter())[p[0]] += 1
    return {layer: c.most_common(1)[0][0] for layer, c in sorted(counts.items())}


def key_of(prefix: str, expert: int, model: MoEModel, proj: str, suffix: str) -> str:
    return f"{prefix}.{expert}.{model.proj_names[proj]}.{suffix}"


def _storage(fmt: Format, scheme: Scheme, dims: Dims, suffix: str, role: str) -> str:
    """The declared dtype name (torch has no uint64 storage for us: 'uint64' specs are int64)."""
    raw = per_role(fmt.tensors[suffix]["dtype"], role)
    if isinstance(raw, str) and raw not in DTYPES:
        raw = expr.evaluate(raw, scheme.env(dims, role), f"{fmt.where} tensors.{suffix}.dtype")
    return str(raw)


def projection_specs(fmt: Format, scheme: Scheme, dims: Dims) -> dict[str, dict[str, ParamSpec]]:
    """proj -> {suffix: spec} of ONE expert's on-disk tensors at this dims' tp."""
    disk = fmt.disk_layout(dims, scheme)
    out: dict[str, dict[str, ParamSpec]] = {p: {} for p in PROJS}
    for name, spec in disk.items():
        suffix = name.split("_", 1)[1]
        spec = dataclasses.replace(
            spec, meta={**spec.meta, "storage": _storage(fmt, scheme, dims, suffix, spec.role)}
        )
        if spec.role == "w2":
            out["down"][suffix] = spec
            continue
        if (
            spec.meta.get("shard") == "replicate"
        ):  # per-projection metadata (e.g. weight_shape): gate's copy loads
            for proj in ("gate", "up"):
                out[proj][suffix] = spec
            continue
        if spec.meta.get("shard") != "rows" or not spec.shape or spec.shape[0] % 2:
            raise CheckpointError(
                f"{fmt.where}: tensors.{suffix} for w13 must be row-sharded with an even row count "
                f"(gate and up each hold half the rows), declared {spec.describe()} shard={spec.meta.get('shard')}"
            )
        half = (spec.shape[0] // 2, *spec.shape[1:])
        for proj in ("gate", "up"):
            out[proj][suffix] = dataclasses.replace(spec, shape=half)
    return out


def read_float_experts(reader, model: MoEModel, layer: int):
    """Float w13 [E, 2I, H] (gate rows then up rows) and w2 [E, H, I] of one layer, fp32, from
    per-expert keys or transformers-5 fused `experts.gate_up_proj` / `experts.down_proj`."""
    import torch

    from quantfw.io.fp8 import read_float  # FP8 releases: dequantized with their block scales

    keys = reader.keys()
    fused = {m["proj"]: k for k in keys if (m := FUSED_RE.match(k)) and int(m["layer"]) == layer}
    if {"gate_up_proj", "down_proj"} <= fused.keys():
        return read_float(reader, fused["gate_up_proj"]).float(), read_float(
            reader, fused["down_proj"]
        ).float()
    prefix = expert_prefixes(keys, model).get(layer)
    if prefix is None:
        raise CheckpointError(f"{reader.folder}: layer {layer} has no routed-expert float weights")
    E = model.num_experts
    need = [key_of(prefix, e, model, p, "weight") for e in range(E) for p in PROJS]
    missing = [k for k in need if k not in reader]
    if missing:
        raise CheckpointError(
            f"{reader.folder}: {len(missing)} float expert weight(s) missing, e.g. '{missing[0]}'"
        )
    w = {
        (e, p): read_float(reader, key_of(prefix, e, model, p, "weight")).float()
        for e in range(E)
        for p in PROJS
    }
    w13 = torch.stack([torch.cat([w[e, "gate"], w[e, "up"]]) for e in range(E)])
    w2 = torch.stack([w[e, "down"] for e in range(E)])
    return w13, w2
