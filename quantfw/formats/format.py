"""Checkpoint formats: a producer's on-disk tensors and the load steps into a scheme's runtime layout.

Scheme and format are two axes (spec section 9): W4A8 per-channel stored msModelSlim-style and
W4A8-clip stored cann-recipes-style load to the same runtime layout. Both are declared in YAML.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from quantfw.errors import ConfigError, LayoutError
from quantfw.io.styles.base import style_of
from quantfw.layout import expr
from quantfw.layout.spec import Dims, ParamSpec, instantiate
from quantfw.schemes.scheme import Scheme
from quantfw.transforms import Pipeline, parse_steps

SHARD_KINDS = {"rows", "cols", "replicate", "refuse"}


@dataclass(frozen=True)
class Format:
    name: str
    metadata: str  # the metadata style's name (quantfw.io.styles.base.STYLES)
    tensors: Mapping[str, Mapping[str, Any]]
    load: tuple[Any, ...]
    requires: tuple[Any, ...] = ()
    doc: str = ""
    metadata_decl: Mapping[str, Any] = field(default_factory=dict)  # the whole `metadata:` mapping

    @property
    def where(self) -> str:
        return f"format '{self.name}' (format/{self.name}.yaml)"

    @property
    def shard_base(self) -> str:
        """Output shards are `<shard_base>-00001-of-0000N.safetensors` (metadata.shard_base)."""
        return self.metadata_decl.get("shard_base", "model")

    @classmethod
    def from_config(cls, cfg: DictConfig | Mapping[str, Any]) -> Format:
        data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        decl = data["metadata"]
        if not isinstance(decl, Mapping):
            raise ConfigError(
                f"format '{data.get('name')}': metadata must be a mapping naming its style and that "
                f"style's keys (see conf/format/msmodelslim.yaml), found {decl!r}"
            )
        decl = dict(decl)
        fmt = cls(
            name=data["name"],
            metadata=decl.get("style", ""),
            metadata_decl=decl,
            tensors=data.get("tensors") or {},
            load=tuple(data.get("load") or ()),
            requires=tuple(data.get("requires") or ()),
            doc=data.get("doc", ""),
        )
        style_of(decl, fmt.where)  # an unknown style fails at compose time, naming the styles
        for name, entry in fmt.tensors.items():
            shard = entry.get("shard", "replicate") if isinstance(entry, Mapping) else None
            kinds = set(shard.values()) if isinstance(shard, Mapping) else {shard}
            if not kinds <= SHARD_KINDS:
                raise ConfigError(
                    f"{fmt.where}: tensors.{name}.shard {shard!r} (allowed: {sorted(SHARD_KINDS)})"
                )
        parse_steps(fmt.load, f"{fmt.where} load")  # unknown ops / keys fail at compose time
        return fmt

    def check_compatible(self, scheme: Scheme) -> None:
        stored = self.metadata_decl.get("weight_bits")
        bits = scheme.flags.get("weight_bits")
        if stored is not None and bits not in stored:
            raise ConfigError(
                f"{self.where}: weight_bits={bits} (allowed: {', '.join(map(str, sorted(stored)))}) "
                f"is what its metadata.weight_bits says it stores (scheme '{scheme.name}')"
            )
        for i, req in enumerate(self.requires):
            if not expr.holds(req["check"], scheme.flags, f"{self.where} requires[{i}]"):
                flags = ", ".join(
                    f"{k}={v}" for k, v in scheme.flags.items() if k in ("weight_bits", "group_size")
                )
                raise ConfigError(f"{self.where} {req['message']} (scheme '{scheme.name}' has {flags})")

    def disk_layout(self, dims: Dims, scheme: Scheme) -> dict[str, ParamSpec]:
        """One expert projection's tensors as this rank loads them (`{role}_{suffix}`)."""
        return instantiate(
            self.tensors,
            dims,
            {**scheme.flags, "G": scheme.flags.get("group_size", 0)},
            f"{self.where} tensors",
        )

    def loaded_layout(self, dims: Dims, scheme: Scheme) -> dict[str, ParamSpec]:
        """The expert-stacked tensors the layer accepts before post-load ([E, *disk shape])."""
        return instantiate(
            self.tensors,
            dims,
            {**scheme.flags, "G": scheme.flags.get("group_size", 0)},
            f"{self.where} tensors",
            stack_experts=True,
        )

    def pipeline(self) -> Pipeline:
        return Pipeline(parse_steps(self.load, f"{self.where} load"))


def check_declared_result(
    pipeline: Pipeline,
    loaded: Mapping[str, ParamSpec],
    expected: Mapping[str, ParamSpec],
    scheme: Scheme,
    dims: Dims,
    label: str,
) -> None:
    """Run the shape rules alone and compare with the scheme's runtime layout (plan time, no data)."""
    state = {n: (s.shape, s.dtype) for n, s in loaded.items()}
    result = pipeline.declare(state, lambda role: scheme.env(dims, role))
    problems = []
    for name, spec in expected.items():
        if name not in result:
            problems.append(f"does not produce {spec.describe()}")
        elif result[name] != (spec.shape, spec.dtype):
            got = f"{list(result[name][0])} {str(result[name][1]).removeprefix('torch.')}"
            problems.append(f"produces {name} {got}, the scheme declares {spec.describe()}")
    for name in result:
        if name not in expected:
            problems.append(f"leaves {name}, which the scheme does not declare")
    if problems:
        raise LayoutError(f"{label} for {scheme.where}: " + "; ".join(problems))
