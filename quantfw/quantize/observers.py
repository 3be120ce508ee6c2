"""Weight observers: how the scales (and, for GPTQ, the rounding) of a weight are chosen.

An observer never changes WHAT is stored, only the values: every observer returns the same
`QuantizedWeight` (q int8 in +-qmax, s1 fp32 [..., N], s2 fp32 [..., N, K/G] for two-level), so
layouts and checkpoints are identical across observers. The scheme's flags fix the grid:

- per-channel (int8, or int4 with group_size 0): one scale per output channel over K;
- two-level int4: s1 = amax/127 and q8 = round(w/s1) as in `primitives.quantize_two_level`; the
  lossy int4 level quantizes q8 per group, and observers choose its per-group scale s2.

`Blocks` exposes that lossy level uniformly as values v [..., N, B, L] (B blocks of L values per
channel) and one scale per block, so each observer is written once for both grids.

Registered observers (`scheme.weight_observer`):
  minmax        t = amax / qmax (the quantizer defaults of spec section 9, bit-identical).
  mse           per-block grid search of a clip ratio r in [observer_min_ratio, 1] minimising the
                weight MSE of the quantized block (observer_grid points, r = 1 included).
  ssz           iterative least squares: t <- <v,q>/<q,q> with q re-rounded at each t, from min-max;
                the best t per block is kept, so never worse than min-max in weight MSE.
  learned_clip  per-output-channel clip ratio (shared by the channel's blocks) minimising the layer
                OUTPUT error ||X (W - Q(W))^T||^2 on calibration inputs X [M, K].
  gptq          error-compensating rounding (GPTQ) with H = X^T X; scales are precomputed on the
                whole weight by `gptq_scale_observer` (static groups), then columns are rounded in
                order (or by decreasing H diagonal with gptq_act_order) and the rounding error is
                propagated into the columns not yet quantized. With fewer calibration rows than
                K/2 the same rounding runs in factored form (H = D + X^T X, no K x K matrix).
Data-driven observers receive x [M, K]; with no x or fewer than `observer_min_tokens` rows they
fall back to `fallback_observer` (see `resolve`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any

import torch

from quantfw.errors import ConfigError, LayoutError
from quantfw.quantize import primitives as P
from quantfw.quantize.qweight import QuantizedWeight
from quantfw.registry import Registry


# Typed observer configs. Each parameter is a dataclass field; its `flag` is the flat key it has in
# the scheme flags and in the written provenance (checkpoint metadata keeps these keys), shared by
# every observer with the same parameter, so one flag holds one value per scheme.
def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def option(flag: str, default: Any, ok: Callable[[Any], bool], allowed: str, ref: bool = False) -> Any:
    """A config field; ref=True: it names another (data-free) observer, which then runs too."""
    return field(default=default, metadata={"flag": flag, "ok": ok, "allowed": allowed, "ref": ref})


@dataclass(frozen=True)
class NoParams:
    """The config of an observer without parameters."""


@dataclass(frozen=True)
class ClipSearch:
    """A grid of clip ratios r in [min_ratio, 1] (r = 1 always included)."""

    grid: int = option("observer_grid", 20, lambda v: _int(v) and v >= 2, "an int >= 2")
    min_ratio: float = option("observer_min_ratio", 0.5, lambda v: _num(v) and 0 < v <= 1, "in (0, 1]")


@dataclass(frozen=True)
class SszConfig:
    iters: int = option("ssz_iters", 10, lambda v: _int(v) and v >= 1, "an int >= 1")


@dataclass(frozen=True)
class DataDriven:
    """What every data-driven observer reads (see `resolve`): with fewer than min_tokens
    calibration rows the data-free `fallback` observer runs instead."""

    min_tokens: int = option("observer_min_tokens", 16, lambda v: _int(v) and v >= 1, "an int >= 1")
    fallback: str = option(
        "fallback_observer", "minmax", lambda v: isinstance(v, str), "a data-free observer", True
    )


@dataclass(frozen=True)
class LearnedClipConfig(ClipSearch, DataDriven):
    pass


@dataclass(frozen=True)
class GptqConfig(DataDriven):
    damp: float = option("gptq_damp", 0.01, lambda v: _num(v) and 0 < v < 1, "in (0, 1)")
    block: int = option("gptq_block", 128, lambda v: _int(v) and v >= 1, "an int >= 1")
    act_order: bool = option("gptq_act_order", False, lambda v: isinstance(v, bool), "true or false")
    scale_observer: str = option(
        "gptq_scale_observer", "mse", lambda v: isinstance(v, str), "a data-free observer", True
    )


@dataclass(frozen=True)
class Observer:
    name: str
    fn: Callable[..., QuantizedWeight]  # fn(w [..., N, K], flags, x [M, K] | None)
    needs_data: bool
    doc: str
    takes_fp8: bool = False  # fn(..., fp8=BlockScales) dequantizes an FP8 weight itself
    config: type = NoParams  # its typed config (a dataclass of `param` fields)

    def fields(self) -> dict[str, Field]:
        return {f.name: f for f in fields(self.config)}

    def flag_of(self, f: Field) -> str:
        """The flat key of a field (a plugin field without one: NAME_FIELD)."""
        return f.metadata.get("flag") or f"{self.name}_{f.name}"

    @property
    def params(self) -> tuple[str, ...]:
        """The flat keys (scheme flags) this observer reads."""
        return tuple(self.flag_of(f) for f in self.fields().values())

    def settings(self, flags: Mapping[str, Any]) -> Any:
        """Its typed config with the values the flags give (defaults for the others)."""
        return self.config(**{n: flags.get(self.flag_of(f), f.default) for n, f in self.fields().items()})


OBSERVERS: Registry[Observer] = Registry("observer")  # plugins: entry-point group quantfw.observers
SELECTOR = "weight_observer"  # the scheme flag naming the observer
SECTIONS = "observers"  # scheme key of the per-observer configs: observers.NAME.FIELD


def register_observer(name: str, needs_data: bool = False, fp8: bool = False, config: type | None = None):
    """Register fn(w, flags, x) as observer `name`; `config` is its typed config dataclass (a
    data-driven one extends DataDriven; default: DataDriven or NoParams)."""
    config = config or (DataDriven if needs_data else NoParams)
    if needs_data and not issubclass(config, DataDriven):
        raise TypeError(f"observer '{name}': a data-driven observer's config must extend DataDriven")

    def deco(fn):
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        OBSERVERS.add(name, Observer(name, fn, needs_data, doc, fp8, config))
        return fn

    return deco


def available() -> list[str]:
    return OBSERVERS.names()


def get_observer(name: str, where: str = "scheme.weight_observer") -> Observer:
    return OBSERVERS.get(name, where)


def selected(flags: Mapping[str, Any]) -> Observer:
    return get_observer(flags.get(SELECTOR, "minmax"))


def settings(flags: Mapping[str, Any], name: str | None = None) -> Any:
    """The typed config of observer `name` (default: the selected one) under these flags."""
    return (get_observer(name) if name else selected(flags)).settings(flags)


def needs_data(flags: Mapping[str, Any]) -> bool:
    """Whether the scheme's selected observer uses calibration inputs."""
    return selected(flags).needs_data


def _flag_fields() -> dict[str, tuple[Observer, Field]]:
    """Every flat observer key -> the first registered observer declaring it and its field."""
    out: dict[str, tuple[Observer, Field]] = {}
    for _, obs in OBSERVERS.items():
        for f in obs.fields().values():
            out.setdefault(obs.flag_of(f), (obs, f))
    return out


def param(flags: Mapping[str, Any], flag: str) -> Any:
    """A flat observer key's value: given, else its declared default."""
    return flags.get(flag, _flag_fields()[flag][1].default)


# The order the written provenance lists the built-in parameters in (checkpoint bytes depend on it);
# other observers' keys follow.
PROVENANCE_ORDER = (
    "observer_grid",
    "observer_min_ratio",
    "ssz_iters",
    "observer_min_tokens",
    "gptq_damp",
    "gptq_block",
    "gptq_act_order",
    "fallback_observer",
    "gptq_scale_observer",
)


def data_params(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The selected observer and every observer parameter in effect (for provenance)."""
    keys = sorted(
        _flag_fields(),
        key=lambda k: (PROVENANCE_ORDER.index(k) if k in PROVENANCE_ORDER else len(PROVENANCE_ORDER), k),
    )
    return {SELECTOR: flags.get(SELECTOR, "minmax"), **{k: param(flags, k) for k in keys}}


def in_use(flags: Mapping[str, Any]) -> list[Observer]:
    """The selected observer and those its reference fields name (fallback, scale observer)."""
    out: list[Observer] = []
    todo = [flags.get(SELECTOR, "minmax")]
    while todo:
        name = todo.pop(0)
        obs = OBSERVERS.get(name) if name in OBSERVERS else None
        if obs is None or obs in out:
            continue
        out.append(obs)
        todo += [flags.get(obs.flag_of(f), f.default) for f in obs.fields().values() if f.metadata.get("ref")]
    return out


def used_params(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The selected observer and the parameters in effect that it (or an observer it names:
    fallback, scale observer) reads; the others cannot change its output."""
    out = {SELECTOR: flags.get(SELECTOR, "minmax")}
    for obs in in_use(flags):
        for f in obs.fields().values():
            out.setdefault(obs.flag_of(f), flags.get(obs.flag_of(f), f.default))
    return dict(sorted(out.items()))


def validate_flags(flags: Mapping[str, Any], where: str, names: Mapping[str, str] | None = None) -> None:
    """All observer problems of a scheme's flags in one error, each naming its key (`names`: the
    key the user wrote for a flat key, e.g. observers.gptq.damp)."""
    names = names or {}
    problems = []
    name = flags.get(SELECTOR, "minmax")
    if name not in OBSERVERS:
        problems.append(f"{SELECTOR}='{name}' is unknown (available: {', '.join(available())})")
    data_free = [n for n, o in OBSERVERS.items() if not o.needs_data]
    for flag, (_, f) in _flag_fields().items():
        value = param(flags, flag)
        if f.metadata.get("ref"):
            if value not in data_free:
                problems.append(
                    f"{names.get(flag, flag)}='{value}' (allowed, data-free observers: {', '.join(data_free)})"
                )
        elif "ok" in f.metadata and not f.metadata["ok"](value):
            problems.append(f"{names.get(flag, flag)}={value!r} (allowed: {f.metadata['allowed']})")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


def default_sections() -> dict[str, dict[str, Any]]:
    """observers.NAME.FIELD defaults of the registered observers with parameters (the schema's)."""
    return {n: {f.name: f.default for f in o.fields().values()} for n, o in OBSERVERS.items() if o.fields()}


# The flat keys of the old recipe shape (scheme.gptq_damp=...): still read, with a note.
_NOTED: dict = {}  # warnings registry of the notes already shown


def legacy_keys() -> dict[str, list[str]]:
    """Flat key -> the observers.NAME.FIELD keys it sets (every observer with that parameter)."""
    out: dict[str, list[str]] = {}
    for n, o in OBSERVERS.items():
        for f in o.fields().values():
            out.setdefault(o.flag_of(f), []).append(f"{SECTIONS}.{n}.{f.name}")
    return out


def flatten(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The flat observer flags of a scheme declaration: `weight_observer` plus every parameter
    from `observers.NAME.FIELD` (or a deprecated flat key, which sets every observer having
    it). Observers in use that share a flat key must agree on its value."""
    sections = dict(data.get(SECTIONS) or {})
    given: dict[str, dict[str, Any]] = {}
    for name, section in sections.items():
        if name not in OBSERVERS:
            raise ConfigError(
                f"{where}: {SECTIONS}.{name}: no observer '{name}' (available: {', '.join(available())})"
            )
        obs = OBSERVERS.get(name)
        if section is not None and not isinstance(section, Mapping):
            raise ConfigError(
                f"{where}: {SECTIONS}.{name}: expected a mapping of its parameters, found {section!r}"
            )
        unknown = sorted(set(section or {}) - set(obs.fields()))
        if unknown:
            known = ", ".join(obs.fields()) or "none"
            raise ConfigError(
                f"{where}: {SECTIONS}.{name}.{unknown[0]}: not a parameter of observer '{name}' (its parameters: {known})"
            )
        given[name] = dict(section or {})
    legacy = legacy_keys()
    for flag, keys in legacy.items():
        if data.get(flag) is None:
            continue
        new = " / ".join(f"scheme.{k}" for k in keys)
        # one line (no source line under it), once per process and key
        warnings.warn_explicit(
            f"{where}: scheme.{flag} is deprecated; use {new}", FutureWarning, "quantfw", 0, registry=_NOTED
        )
        for key in keys:
            _, name, fname = key.split(".")
            given.setdefault(name, {})[fname] = data[flag]

    def value(obs: Observer, f: Field) -> Any:
        return given.get(obs.name, {}).get(f.name, f.default)

    flags: dict[str, Any] = {SELECTOR: data.get(SELECTOR) or "minmax"}
    used: list[Observer] = []
    todo = [flags[SELECTOR]]
    while todo:  # the selected observer, then those its reference fields name
        name = todo.pop(0)
        obs = OBSERVERS.get(name) if isinstance(name, str) and name in OBSERVERS else None
        if obs is not None and obs not in used:
            used.append(obs)
            todo += [value(obs, f) for f in obs.fields().values() if f.metadata.get("ref")]
    names: dict[str, str] = {}  # flat key -> the key the user writes, for messages
    for obs in used:
        for f in obs.fields().values():
            flag, v = obs.flag_of(f), value(obs, f)
            if flag in names and flags[flag] != v:
                raise ConfigError(
                    f"{where}: {names[flag]}={flags[flag]!r} and {SECTIONS}.{obs.name}.{f.name}={v!r} are one "
                    f"parameter ({flag}) of the observers in use; give them one value"
                )
            flags.setdefault(flag, v)
            names.setdefault(flag, f"{SECTIONS}.{obs.name}.{f.name}")
    for flag, (obs, f) in _flag_fields().items():
        flags.setdefault(flag, value(obs, f))
        names.setdefault(flag, f"{SECTIONS}.{obs.name}.{f.name}")
    for flag in legacy:
        if data.get(flag) is not None:
            names[flag] = flag  # a deprecated flat key is named as written
    validate_flags(flags, where, names)
    return flags


def resolve(flags: Mapping[str, Any], x: torch.Tensor | None) -> tuple[Observer, str | None]:
    """The observer that will run, and why it is the fallback (None when it is the chosen one)."""
    obs = selected(flags)
    if not obs.needs_data:
        return obs, None
    cfg = obs.settings(flags)
    if x is None:
        reason = "no calibration inputs"
    elif x.shape[0] < cfg.min_tokens:
        reason = f"{x.shape[0]} calibration tokens < observer_min_tokens={cfg.min_tokens}"
    else:
        return obs, None
    return get_observer(cfg.fallback, "scheme.fallback_observer"), reason


# ---------------------------------------------------------------------------------------------
# The lossy level of a scheme's grid, as blocks.


@dataclass
class Blocks:
    """v [..., N, B, L]: the values put on the int grid, one scale per block (B = 1 per-channel).

    `target` is what the error is measured against: the float weight in the same units (w/s1 for
    two-level, where v is the spec's rounded q8). Equal to v for per-channel grids."""

    v: torch.Tensor
    qmax: int
    s1: torch.Tensor | None  # two-level: the fixed first-level scale [..., N]
    target: torch.Tensor

    def amax_scale(self) -> torch.Tensor:
        return self.v.abs().amax(dim=-1) / self.qmax

    def round(self, t: torch.Tensor) -> torch.Tensor:
        return torch.div(self.v, t.unsqueeze(-1)).round_().clamp_(-self.qmax, self.qmax)

    def block_error(self, t: torch.Tensor) -> torch.Tensor:
        """Squared error per block of v against its quantized copy at scales t [..., N, B]."""
        return torch.sub(self.target, self.round(t).mul_(t.unsqueeze(-1))).square_().sum(dim=-1)

    def finish(self, t: torch.Tensor, q: torch.Tensor | None = None) -> QuantizedWeight:
        t = P._nonzero(t)
        q = self.round(t) if q is None else q
        q = q.reshape(*q.shape[:-2], -1).to(torch.int8)
        if self.s1 is None:
            return QuantizedWeight(q, t.squeeze(-1).float())
        return QuantizedWeight(q, self.s1, t.float())


def blocks(w: torch.Tensor, flags: Mapping[str, Any]) -> Blocks:
    bits, gs = flags["weight_bits"], flags.get("group_size", 0)
    if not torch.isfinite(w).all():
        raise ConfigError("weight contains NaN or Inf")
    wf = w.float()
    if gs and bits < P.MAX_BITS:
        k = w.shape[-1]
        if k % gs:
            raise ConfigError(
                f"group_size {gs} does not divide K={k}; use a divisor of K or scheme.group_size=0 (per-channel)"
            )
        s1 = P._nonzero(wf.abs().amax(dim=-1) / 127)
        q8 = torch.clamp(torch.round(wf / s1.unsqueeze(-1)), -127, 127)
        shape = (*q8.shape[:-1], k // gs, gs)
        return Blocks(q8.reshape(shape), P.qmax(bits), s1, (wf / s1.unsqueeze(-1)).reshape(shape))
    v = wf.unsqueeze(-2)
    return Blocks(v, P.qmax(bits), None, v)


def _ratios(cfg: ClipSearch) -> torch.Tensor:
    r = torch.linspace(float(cfg.min_ratio), 1.0, cfg.grid)
    r[-1] = 1.0  # min-max is always a candidate
    return r


# ---------------------------------------------------------------------------------------------
# Data-free observers.


@register_observer("minmax", fp8=True)
def _minmax(
    w: torch.Tensor, flags: Mapping[str, Any], x: torch.Tensor | None = None, fp8=None
) -> QuantizedWeight:
    """Round-to-nearest with amax scales (spec section 9 defaults): the cache-blocked primitives."""
    bits, gs = flags["weight_bits"], flags.get("group_size", 0)
    dtype = flags.get("compute_dtype", "float32")
    two_level = bool(gs) and bits < P.MAX_BITS
    if dtype == "float32" and not two_level:
        from quantfw.quantize.fused import quantize_per_channel_encoded

        # fp32 per-channel grids in one compiled kernel: FP8 dequantized inside it (one pass over
        # the FP8 bytes), plus the encodings the caller's format asks for (flags "encodings").
        scales = (fp8.scale_inv, fp8.block) if fp8 is not None else (None, None)
        fast = quantize_per_channel_encoded(w, bits, *scales, flags.get("encodings", ()))
        if fast is not None:
            q, s, encoded = fast
            return QuantizedWeight(q, s, encoded=encoded)
    if fp8 is not None:
        from quantfw.io.fp8 import dequantize

        w = dequantize(w, fp8.scale_inv, fp8.block)
    if two_level:
        return QuantizedWeight(*P.quantize_two_level(w, gs, bits))
    if dtype == "float32":
        return QuantizedWeight(*P.quantize_per_channel(w, bits))
    # quantize.compute_dtype (the reference converter's bf16 chain); encoders read it from info
    q, s = P.quantize_per_channel(w, bits, compute_dtype=getattr(torch, dtype))
    return QuantizedWeight(q, s, info={"compute_dtype": dtype})


def _by_rows(b: Blocks, fn: Callable[[Blocks], torch.Tensor]) -> torch.Tensor:
    """fn's per-block scales [..., N, B], computed over consecutive channel rows sized for the cache
    (every step is per channel, so this equals fn on the whole weight, bit for bit)."""
    v, tg = b.v.reshape(-1, *b.v.shape[-2:]), b.target.reshape(-1, *b.v.shape[-2:])
    out = torch.empty(v.shape[:-1])
    for rows in P._row_blocks(v.shape[0], v.shape[1] * v.shape[2]):
        out[rows] = fn(Blocks(v[rows], b.qmax, None, tg[rows]))
    return out.reshape(b.v.shape[:-1])


def _mse_rows(b: Blocks, ratios: list[float]) -> torch.Tensor:
    base = b.amax_scale()
    best_t, best_err = base, None
    for r in ratios:
        t = P._nonzero(base * r)
        err = b.block_error(t)
        if best_err is None:
            best_t, best_err = t, err
        else:
            better = err < best_err
            best_t, best_err = torch.where(better, t, best_t), torch.where(better, err, best_err)
    return best_t


def mse_scales(b: Blocks, flags: Mapping[str, Any]) -> torch.Tensor:
    ratios = _ratios(settings(flags, "mse")).tolist()
    return _by_rows(b, lambda rows: _mse_rows(rows, ratios))


@register_observer("mse", config=ClipSearch)
def _mse(w: torch.Tensor, flags: Mapping[str, Any], x: torch.Tensor | None = None) -> QuantizedWeight:
    """Per-block grid search of a clip ratio minimising the weight MSE."""
    b = blocks(w, flags)
    return b.finish(mse_scales(b, flags))


@register_observer("ssz", config=SszConfig)
def _ssz(w: torch.Tensor, flags: Mapping[str, Any], x: torch.Tensor | None = None) -> QuantizedWeight:
    """Iterative least-squares scale refinement from min-max, best per block kept."""
    b = blocks(w, flags)
    return b.finish(_by_rows(b, lambda rows: _ssz_rows(rows, settings(flags, "ssz").iters)))


def _ssz_rows(b: Blocks, iters: int) -> torch.Tensor:
    t = P._nonzero(b.amax_scale())
    best_t, best_err = t, b.block_error(t)
    for _ in range(iters):
        q = b.round(t)
        den = (q * q).sum(dim=-1)
        t = torch.where(den > 0, (b.target * q).sum(dim=-1) / den.clamp_min(1), t)
        t = P._nonzero(t)
        err = b.block_error(t)
        better = err < best_err
        best_t, best_err = torch.where(better, t, best_t), torch.where(better, err, best_err)
    return best_t


# ---------------------------------------------------------------------------------------------
# Data-driven observers: one weight [N, K] and its calibration inputs x [M, K].


def _check_data(name: str, w: torch.Tensor, x: torch.Tensor) -> None:
    if w.dim() != 2 or x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise LayoutError(
            f"observer '{name}': expected weight [N, K] and calibration inputs [M, K], "
            f"found {list(w.shape)} and {list(x.shape)}"
        )


def _output_factor(x: torch.Tensor) -> torch.Tensor:
    """A [R, K] with ||A d||^2 = ||X d||^2 for every d, R = min(M, K) (so the cost is bounded)."""
    x = x.float()
    if x.shape[0] <= x.shape[1]:
        return x
    h = x.T @ x
    h.diagonal().add_(1e-8 * h.diagonal().mean().clamp_min(1e-30))  # PD for the factorisation only
    return torch.linalg.cholesky(h).T


@register_observer("learned_clip", needs_data=True, config=LearnedClipConfig)
def _learned_clip(
    w: torch.Tensor, flags: Mapping[str, Any], x: torch.Tensor | None = None
) -> QuantizedWeight:
    """Per-output-channel clip ratio minimising the layer-output error on calibration inputs."""
    _check_data("learned_clip", w, x)
    b = blocks(w, flags)
    wf, a, ratios = w.float(), _output_factor(x), _ratios(settings(flags, "learned_clip")).tolist()
    best_r = torch.empty(w.shape[0])
    # Channels in blocks of ~_CLIP_BLOCK weights, so the dequantized candidates stay in cache, or
    # wider with many calibration rows, where the GEMM with the factor dominates and wants width.
    step = max(1, _CLIP_BLOCK // w.shape[1], a.shape[0] // 4)
    for r0 in range(0, w.shape[0], step):
        rows = slice(r0, r0 + step)
        sub = Blocks(b.v[rows], b.qmax, None if b.s1 is None else b.s1[rows], b.target[rows])
        best_r[rows] = _clip_ratios(sub, wf[rows], a, ratios)
    qw = b.finish(b.amax_scale() * best_r.unsqueeze(-1))
    qw.info = {"clip_ratio": best_r}
    return qw


_CLIP_BLOCK = 1 << 18


def _clip_ratios(b: Blocks, wf: torch.Tensor, a: torch.Tensor, ratios: list[float]) -> torch.Tensor:
    """Per channel of b, the ratio of `ratios` with the least output error ||a (w - Q(w))^T||^2."""
    base = b.amax_scale()
    best_r = best_err = None
    for r in ratios:
        deq = b.finish(base * r).dequantize()
        err = (a @ (wf - deq).T).pow(2).sum(dim=0)  # [N]
        rr = torch.full_like(err, r)
        if best_err is None:
            best_r, best_err = rr, err
        else:
            better = err < best_err
            best_r, best_err = torch.where(better, rr, best_r), torch.where(better, err, best_err)
    return best_r


def _element_scales(qw: QuantizedWeight, k: int) -> torch.Tensor:
    s = qw.s1.float().unsqueeze(-1).expand(*qw.s1.shape, k)
    if qw.s2 is not None:
        s = s * P._expand_groups(qw.s2.float(), k)
    return s


@register_observer("gptq", needs_data=True, config=GptqConfig)
def _gptq(w: torch.Tensor, flags: Mapping[str, Any], x: torch.Tensor | None = None) -> QuantizedWeight:
    """GPTQ error-compensating rounding with H = X^T X and precomputed (static) scales."""
    _check_data("gptq", w, x)
    n, k = w.shape
    cfg: GptqConfig = settings(flags, "gptq")
    base = get_observer(cfg.scale_observer).fn(w, flags, None)
    qmax = P.qmax(flags["weight_bits"])
    scale = _element_scales(base, k).contiguous()
    damp, act_order, block = cfg.damp, cfg.act_order, cfg.block
    run = _gptq_low_rank if _low_rank(x.shape[0], k) else _gptq_dense
    Q = run(w.float().clone(), scale, x.float(), damp, act_order, block, qmax)
    return QuantizedWeight(Q.to(torch.int8), base.s1, base.s2)


def _low_rank(rows: int, k: int) -> bool:
    """Fewer calibration rows than half the input width: the factored form does less work."""
    return 2 * rows < k


def _gptq_dense(W, scale, x, damp, act_order, block, qmax) -> torch.Tensor:
    """Column-by-column rounding with the upper Cholesky factor of H^-1 (K x K)."""
    k = W.shape[1]
    hinv, dead, perm = _hessian_factor(x, damp, act_order)
    W[:, dead] = 0.0
    if perm is not None:
        W, scale = W[:, perm], scale[:, perm]
    Q = torch.zeros_like(W)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, S1, Hi = W[:, i1:i2].clone(), scale[:, i1:i2], hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = W1[:, i]
            q = torch.clamp(torch.round(col / S1[:, i]), -qmax, qmax)
            Q[:, i1 + i] = q
            e = (col - q * S1[:, i]) / Hi[i, i]
            W1[:, i:] -= e.unsqueeze(1) * Hi[i, i:].unsqueeze(0)
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return Q if perm is None else Q[:, torch.argsort(perm)]


def _gptq_low_rank(W, scale, x, damp, act_order, block, qmax) -> torch.Tensor:
    """The same rounding for H = D + X^T X with D diagonal (damping, dead channels) and X [M, K],
    M < K, without any K x K matrix. Quantizing column i, with F the columns not yet quantized,
    adds (w_i - q_i) / [H_F^-1]_ii * x_j . v_i / D_j to every later column j, where
    v_i = K_F x_i / D_i and K_F = (I + X_F D_F^-1 X_F^T)^-1 (M x M, Woodbury). So the later columns
    see the sum S = sum_i e_i v_i^T [N, M] through x_j / D_j. Within a block of columns P, the
    per-column downdates of K_F are the LDL^T pivots of T = D_P - P^T K_F P (float64)."""
    k = W.shape[1]
    X = x.double()
    sq = X.square().sum(0)
    dead = sq == 0
    D = damp * (sq.sum() + dead.sum()) / k + dead.double()  # = damp * mean(diag(H)) + 1 on dead
    W[:, dead] = 0.0
    if act_order:
        perm = torch.argsort(torch.where(dead, 1.0, sq), descending=True, stable=True)
        W, scale, X, D = W[:, perm], scale[:, perm], X[:, perm], D[perm]
    Xd = X / D  # x_j / D_j
    Kf = torch.linalg.inv(torch.eye(X.shape[0], dtype=torch.float64) + Xd @ X.T)
    # Column-major from here: each column a contiguous row.
    WT, scaleT = W.T.contiguous(), scale.T.contiguous()
    QT = torch.zeros_like(WT)
    ST = torch.zeros(X.shape[0], WT.shape[1])  # S^T
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        P_, Db = X[:, i1:i2], D[i1:i2]
        Z = Kf @ P_
        T = torch.diag(Db) - P_.T @ Z
        R, info = torch.linalg.cholesky_ex(T)
        if info != 0:
            raise LayoutError("gptq: the calibration Hessian is not positive definite")
        r = R.diagonal()
        kx = torch.linalg.solve_triangular((R / r).T, Z, upper=True, left=False)  # K_F x_i, each i
        v, h = (kx / Db).T, r.square() / Db.square()  # v_i; [H_F^-1]_ii
        Kf = Kf + Z @ torch.cholesky_solve(Z.T, R)  # the block's columns leave F
        coef = (v @ Xd[:, i1:i2]).float()  # [i, j]: x_j . v_i / D_j
        W1 = WT[i1:i2] + Xd[:, i1:i2].T.float() @ ST
        S1, hf = scaleT[i1:i2], h.float()
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = W1[i]
            q = torch.clamp(torch.round(col / S1[i]), -qmax, qmax)
            QT[i1 + i] = q
            e = (col - q * S1[i]) / hf[i]
            W1[i + 1 :].addr_(coef[i, i + 1 :], e)
            err1[i] = e
        ST += v.float().T @ err1
    Q = QT.T
    return Q if not act_order else Q[:, torch.argsort(perm)]


def _hessian_factor(
    x: torch.Tensor, damp: float, act_order: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(upper Cholesky factor of H^-1 in quantization order, dead input channels, column order or
    None) for H = X^T X + damp * mean(diag) * I. At most two K x K matrices are alive at a time
    (K = 7168: 2 x 205 MB); more damping is added if H is still not positive definite."""
    xf = x.float()
    H = xf.T @ xf
    del xf
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    mean = H.diagonal().mean()
    H.diagonal().add_(damp * mean)
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H)
        if info == 0:
            break
        H.diagonal().add_(10.0**attempt * 1e-4 * mean)
    else:
        raise LayoutError("gptq: the calibration Hessian is not positive definite even after extra damping")
    del H
    inv = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(inv, upper=True)
    if info != 0:
        raise LayoutError("gptq: the inverse calibration Hessian is not positive definite")
    return U, dead, perm
