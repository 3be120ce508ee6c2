"""Scheme objects: flags + runtime parameter layout + compute plan, built from conf/scheme/*.yaml.

A scheme is data. The generic MoE layer asks it for its runtime layout and its compute plan and
never looks at its name or flags, so a new variant is a YAML file, not a class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from quantfw.errors import ConfigError
from quantfw.layout import branches, expr
from quantfw.layout.spec import ROLES, Dims, ParamSpec, instantiate
from quantfw.schemes.plan_ops import PLAN_OPS

__all__ = ["PLAN_OPS", "PlanStep", "Scheme"]

# Layout and compute flags: they decide what is stored and how it runs.
LAYOUT_FLAGS = ("weight_bits", "group_size", "activation_use_clip", "fused_swiglu_quant")
# Load options: what loading does with a checkpoint, never what is written.
LOAD_OPTIONS = ("missing_alpha",)
FILL_OPTION = (
    "missing_alpha"  # error | ones: a checkpoint lacking an optional parameter fails / loads its init
)
# Quantizer options: `weight_observer` and `observers.NAME.FIELD`, each observer's typed config
# (quantfw.quantize.observers); they pick scales and rounding, never the layout. In `flags` they
# are flat keys (observer_grid, gptq_damp, ...), as the checkpoint provenance writes them.
FLAGS = (*LAYOUT_FLAGS, *LOAD_OPTIONS)
MIN_WEIGHT_BITS, MAX_WEIGHT_BITS = 2, 8  # a {-1, 0, 1} grid up to int8, the widest integer stored
PLAN_INPUTS = ("x", "counts")  # tokens sorted by expert, and per-expert token counts
PLAN_STEP_KEYS = {"op", "params", "out", "when"}
# Keys of the other step vocabulary, refused with the word to use instead.
REFUSED_PLAN_KEYS = {
    "args": "compute steps name their inputs under 'params' (op argument: value name), as transform steps do"
}


@dataclass(frozen=True)
class PlanStep:
    op: str
    args: Mapping[str, str]  # op argument -> value name in the plan environment
    out: tuple[str, ...]


@dataclass(frozen=True)
class OptionalParam:
    """A runtime parameter declared `optional: true`: only variants whose flag `when` names use it,
    and a checkpoint may lack it (the load option then fills `init`)."""

    name: str
    roles: tuple[str, ...]
    flag: str
    init: str

    @property
    def init_value(self) -> int:
        return {"zeros": 0, "ones": 1}[self.init]


def optional_params(runtime: Mapping[str, Any], where: str = "scheme runtime") -> dict[str, OptionalParam]:
    """The optional parameters a runtime layout declares, by name."""
    out = {}
    for name, entry in runtime.items():
        if not isinstance(entry, Mapping) or not entry.get("optional"):
            continue
        flag = entry.get("when")
        if not isinstance(flag, str) or not flag.isidentifier():
            raise ConfigError(
                f"{where}.{name}: optional needs when: FLAG (the flag that enables it), found {flag!r}"
            )
        init = entry.get("init", "ones")
        if init not in ("zeros", "ones"):
            raise ConfigError(
                f"{where}.{name}: optional needs init: ones or zeros (what a missing one loads as), found {init!r}"
            )
        out[name] = OptionalParam(name, tuple(entry.get("roles", ROLES)), flag, init)
    return out


@dataclass(frozen=True)
class Scheme:
    name: str
    flags: Mapping[str, Any]
    runtime: Mapping[str, Mapping[str, Any]]
    compute: tuple[Any, ...]
    doc: str = ""
    # The widths its runtime layout can hold (`weight_bits_range: [lo, hi]`, default 2 to 8).
    bits_range: tuple[int, int] = (MIN_WEIGHT_BITS, MAX_WEIGHT_BITS)

    @property
    def where(self) -> str:
        return f"scheme '{self.name}' (scheme/{self.name}.yaml)"

    @classmethod
    def from_config(cls, cfg: DictConfig | Mapping[str, Any]) -> Scheme:
        from quantfw.quantize.observers import flatten

        data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        where = f"scheme '{data.get('name')}' (scheme/{data.get('name')}.yaml)"
        flags = {**{k: data[k] for k in FLAGS if k in data}, **flatten(data, where)}
        scheme = cls(
            name=data["name"],
            flags=flags,
            runtime=data.get("runtime") or {},
            compute=tuple(data.get("compute") or ()),
            doc=data.get("doc", ""),
            bits_range=tuple(data.get("weight_bits_range") or (MIN_WEIGHT_BITS, MAX_WEIGHT_BITS)),
        )
        scheme.validate()
        return scheme

    def validate(self) -> None:
        f = self.flags
        bits = f.get("weight_bits")
        lo, hi = self.bits_range
        if not MIN_WEIGHT_BITS <= lo <= hi <= MAX_WEIGHT_BITS:
            raise ConfigError(
                f"{self.where}: weight_bits_range={list(self.bits_range)} "
                f"(allowed: within {MIN_WEIGHT_BITS} to {MAX_WEIGHT_BITS})"
            )
        if not isinstance(bits, int) or isinstance(bits, bool) or not lo <= bits <= hi:
            held = (
                ""
                if (lo, hi) == (MIN_WEIGHT_BITS, MAX_WEIGHT_BITS)
                else ": its weight_bits_range, what its runtime layout holds"
            )
            raise ConfigError(f"{self.where}: weight_bits={bits} (allowed: {lo} to {hi}){held}")
        if f.get("group_size", 0) < 0:
            raise ConfigError(f"{self.where}: group_size={f['group_size']} must be >= 0 (0 = per-channel)")
        if f.get("group_size") and f.get("weight_bits") == MAX_WEIGHT_BITS:
            raise ConfigError(f"{self.where}: group_size applies to sub-8-bit weights only (weight_bits=8)")
        if f.get(FILL_OPTION, "error") not in ("error", "ones"):
            raise ConfigError(f"{self.where}: {FILL_OPTION}='{f[FILL_OPTION]}' (allowed: error, ones)")
        from quantfw.quantize.observers import validate_flags

        validate_flags(f, self.where)  # from_config checked them under the keys the user wrote
        if not self.runtime:
            raise ConfigError(f"{self.where}: 'runtime' declares no parameters")
        optional_params(self.runtime, f"{self.where} runtime")
        self.plan()  # names every undefined value or unknown op

    def env(self, dims: Dims, role: str) -> dict[str, Any]:
        return {
            **self.flags,
            "G": self.flags.get("group_size", 0),
            **dims.role(role),
            "role_is_w13": role == "w13",
        }

    def check_dims(self, dims: Dims) -> None:
        """Per-group quantization needs the group size to divide K of both projections."""
        gs = self.flags.get("group_size", 0)
        bad = [f"{r} K={dims.role(r)['K']}" for r in ROLES if gs and dims.role(r)["K"] % gs]
        if bad:
            raise ConfigError(
                f"{self.where}: group_size={gs} does not divide {' and '.join(bad)}; "
                f"use a divisor of both (H={dims.H}, I/tp={dims.I // dims.tp}) or scheme.group_size=0"
            )

    def runtime_layout(self, dims: Dims) -> dict[str, ParamSpec]:
        """The parameters the kernels consume after post-load, for this rank's dims."""
        self.check_dims(dims)
        return instantiate(
            self.runtime, dims, {**self.flags, "G": self.flags.get("group_size", 0)}, f"{self.where} runtime"
        )

    def runtime_names(self) -> set[str]:
        names = set()
        for name, entry in self.runtime.items():
            for role in entry.get("roles", ROLES) if isinstance(entry, Mapping) else ROLES:
                if expr.holds(
                    entry.get("when") if isinstance(entry, Mapping) else None,
                    self.flags,
                    f"{self.where} runtime.{name}.when",
                ):
                    names.add(f"{role}_{name}")
        return names

    def plan(self) -> list[PlanStep]:
        """The compute steps that apply under the current flags, checked for undefined names."""
        defined = set(PLAN_INPUTS) | self.runtime_names()
        steps = []
        for raw, guards, at in branches.flatten(self.compute, f"{self.where} compute", indexed=True):
            if not isinstance(raw, Mapping) or "op" not in raw:
                raise ConfigError(f"{at}: expected a mapping with 'op', found {raw!r}")
            refused = [k for k in REFUSED_PLAN_KEYS if k in raw]
            if refused:
                raise ConfigError(
                    f"{at} ({raw['op']}): key '{refused[0]}' is not used here: {REFUSED_PLAN_KEYS[refused[0]]}"
                )
            unknown = set(raw) - PLAN_STEP_KEYS
            if unknown:
                raise ConfigError(
                    f"{at}: unknown key(s) {sorted(unknown)} (allowed: {sorted(PLAN_STEP_KEYS)})"
                )
            PLAN_OPS.get(raw["op"], at)
            if not branches.holds(guards, raw.get("when"), self.flags, at):
                continue
            args = dict(raw.get("params") or {})
            for arg, value in args.items():
                if value is not None and value not in defined:  # null = the op's "not given" (None)
                    raise ConfigError(
                        f"{at} ({raw['op']}): argument {arg}={value} is not defined before this step"
                    )
            out = raw.get("out")
            out = (out,) if isinstance(out, str) else tuple(out or ())
            if not out:
                raise ConfigError(f"{at} ({raw['op']}): no 'out'")
            defined |= set(out)
            steps.append(PlanStep(raw["op"], args, out))
        if not steps or steps[-1].out != ("out",):
            raise ConfigError(f"{self.where}: the compute plan must end in a step with out: out")
        return steps

    def layout_flags(self) -> dict[str, Any]:
        return {k: v for k, v in self.flags.items() if k in LAYOUT_FLAGS}

    def optional_in_use(self) -> dict[str, OptionalParam]:
        """The optional runtime parameters this variant's flags enable."""
        return {n: p for n, p in optional_params(self.runtime).items() if self.flags.get(p.flag)}

    @property
    def clips(self) -> bool:
        """Whether the scheme carries learned per-expert activation parameters (the clip), read
        from its optional parameter declarations: the one place that decides it."""
        return bool(self.optional_in_use())

    def fills_missing(self) -> bool:
        """Load option: a checkpoint lacking an optional parameter loads it at its `init`."""
        return self.flags.get(FILL_OPTION) == "ones"

    def value_ranges(self) -> dict[str, tuple[float, float, str]]:
        """name -> (low exclusive, high inclusive, why) of runtime parameters declaring `values`."""
        out = {}
        for name, entry in self.runtime.items():
            v = entry.get("values") if isinstance(entry, Mapping) else None
            if v:
                out[name] = (float(v["above"]), float(v["at_most"]), str(v.get("why", "")))
        return out

    def output_flags(self) -> dict[str, Any]:
        """The flags that change written bytes: layout flags, the observer and the parameters it
        reads (load options and other observers' parameters do not)."""
        from quantfw.quantize.observers import used_params

        return {**self.layout_flags(), **used_params(self.flags)}

    def signature(self) -> dict[str, Any]:
        """What makes two schemes the same scheme for their output: the flags that change the
        written bytes, the runtime layout and the compute plan."""
        return {
            "flags": self.output_flags(),
            "runtime": self.runtime,
            "plan": [s.__dict__ for s in self.plan()],
        }
