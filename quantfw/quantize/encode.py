"""One float projection -> the format's on-disk tensors: quantize with the scheme's observer,
encode with the format's registered encoders, name with the checkpoint's expert keys.

Routed experts follow the scheme; non-expert linears written W8A8 use the format's own W8A8
tensors (one projection, role w2: N and K as they are).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from quantfw.errors import CheckpointError, ConfigError
from quantfw.formats.encoders import check_finite, encode_role, fusable
from quantfw.formats.format import Format
from quantfw.io import metadata
from quantfw.io.experts import MoEModel, key_of, projection_specs
from quantfw.layout.spec import Dims, ParamSpec, instantiate
from quantfw.quantize import observers
from quantfw.quantize.weights import QuantizedWeight, quantize_weight
from quantfw.schemes.scheme import Scheme


def layer_of(prefix: str) -> int:
    return int(prefix.split("layers.")[-1].split(".")[0])


def _quantize(w: torch.Tensor, flags: Mapping, x: torch.Tensor | None, src: str, fp8=None) -> QuantizedWeight:
    try:
        # bf16/fp16 go in as they are: the primitives convert to fp32 block by block.
        qw = quantize_weight(w, flags, x, fp8)
    except ConfigError:
        if fp8 is not None:
            from quantfw.io.fp8 import dequantize

            w = dequantize(w, fp8.scale_inv, fp8.block)
        if not torch.isfinite(w).all():
            raise CheckpointError(f"{src}: contains NaN or Inf") from None
        raise
    for level, s in (("scale", qw.s1), ("second-level scale", qw.s2)):
        if s is not None:
            check_finite(src, level, s.float())  # u64-encoded scales are written as integers
    return qw


COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_flags(flags: Mapping, compute_dtype: str) -> dict:
    """Scheme flags plus quantize.compute_dtype for the observer. bfloat16 is the reference
    converter's chain, defined for its round-to-nearest per-channel grid only."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"quantize.compute_dtype={compute_dtype!r} (allowed: {', '.join(COMPUTE_DTYPES)})")
    if compute_dtype == "float32":
        return dict(flags)
    observer = flags.get("weight_observer", "minmax")
    if observer != "minmax" or (flags["weight_bits"] == 4 and flags.get("group_size")):
        raise ConfigError(
            f"quantize.compute_dtype={compute_dtype} reproduces the reference converter's min-max per-channel "
            f"chain only (found weight_observer={observer}, group_size={flags.get('group_size')})"
        )
    return {**flags, "compute_dtype": compute_dtype}


class ExpertEncoder:
    def __init__(
        self,
        scheme: Scheme,
        fmt: Format,
        model: MoEModel,
        dims: Dims,
        compute_dtype: str = "float32",
        linear_scheme: Scheme | None = None,
    ):
        self.scheme, self.fmt, self.model = scheme, fmt, model
        self.flags = compute_flags(scheme.flags, compute_dtype)
        self.specs = projection_specs(fmt, scheme, dims)
        unwritable = sorted(
            {s for p in self.specs.values() for s, spec in p.items() if not spec.meta.get("encode")}
        )
        if unwritable:
            raise ConfigError(
                f"{fmt.where} declares no encode: for {unwritable}: it is read-only "
                "(quantize to format=msmodelslim or format=compressed_tensors)"
            )
        self.qtype = metadata.expert_type(scheme)
        self.needs_data = observers.needs_data(scheme.flags)
        # Non-expert linears: the linear scheme's layout flags with the experts' observer.
        self.linear_scheme = linear_scheme or linear_scheme_named(None)
        self.linear_flags = {**self.flags, **self.linear_scheme.layout_flags()}
        self.linear_type = metadata.quant_type(self.linear_flags["weight_bits"])
        # Per projection: the flags plus what the format's encoders let the quantize kernel compute.
        self.proj_flags = {
            p: {**self.flags, "encodings": fusable(s, model.float_shape(p)[0])} for p, s in self.specs.items()
        }

    def expert(
        self,
        prefix: str,
        expert: int,
        proj: str,
        w: torch.Tensor,
        x: torch.Tensor | None,
        alpha: torch.Tensor | None,
        src: str,
        fp8=None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict | None]:
        """(tensors, per-tensor types, weight-observer record or None) of one expert projection.
        alpha None: the encoder's alpha = 1."""
        specs: dict[str, ParamSpec] = self.specs[proj]
        qw = _quantize(w, self.proj_flags[proj], x, src, fp8)
        record = None
        if self.needs_data:
            ratio = qw.info.get("clip_ratio")
            record = {
                "layer": layer_of(prefix),
                "expert": expert,
                "proj": proj,
                "observer": qw.info["observer"],
                "tokens": 0 if x is None else int(x.shape[0]),
                "fallback": qw.info["fallback"],
                "clip_ratio_mean": None if ratio is None else round(float(ratio.mean()), 6),
            }
        out, types = {}, {}
        where = f"{self.fmt.where} {prefix}.{expert}.{proj}"
        for suffix, t in encode_role(specs, qw, alpha, where).items():
            key = key_of(prefix, expert, self.model, proj, suffix)
            check_finite(src, key, t)
            out[key] = t.view(torch.uint64) if _stored_dtype(specs[suffix]) == torch.uint64 else t
            types[key] = self.qtype
        return out, types, record

    def planned_expert(self, prefix: str, expert: int, proj: str) -> list[tuple[str, torch.dtype, tuple]]:
        """(key, stored dtype, shape) of what `expert` writes, in its order, from the declarations
        alone (encode_role holds every tensor to its declared shape and dtype)."""
        return [
            (key_of(prefix, expert, self.model, proj, suffix), _stored_dtype(spec), spec.shape)
            for suffix, spec in self.specs[proj].items()
        ]

    def planned_linear(self, module: str, n: int, k: int) -> list[tuple[str, torch.dtype, tuple]]:
        """(key, stored dtype, shape) of what `linear` writes for an [n, k] weight, in its order."""
        specs = self.linear_specs(n, k)
        return [(f"{module}.{suffix}", spec.dtype, spec.shape) for suffix, spec in specs.items()]

    def linear_specs(self, n: int, k: int) -> dict[str, ParamSpec]:
        """The format's declared tensors of a non-expert linear [n, k] in the linear scheme."""
        return {
            name.split("_", 1)[1]: spec
            for name, spec in instantiate(
                self.fmt.tensors, Dims(E=1, H=n, I=k), {**self.linear_flags, "G": 0}, self.fmt.where
            ).items()
            if spec.role == "w2"
        }

    def linear(
        self, module: str, w: torch.Tensor, src: str, fp8=None
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A non-expert linear [N, K] in the linear scheme, in the format's declared tensors (weight, scale, offset...);
        fp8: w is an FP8 weight with these block scales."""
        specs = self.linear_specs(*w.shape)
        qw = _quantize(w, self.linear_flags, None, src, fp8)
        out, types = {}, {}
        for suffix, t in encode_role(specs, qw, None, f"{self.fmt.where} {module}").items():
            check_finite(src, f"{module}.{suffix}", t)
            out[f"{module}.{suffix}"] = t
            types[f"{module}.{suffix}"] = self.linear_type
        return out, types


def _stored_dtype(spec: ParamSpec) -> torch.dtype:
    """Declared uint64 is stored as safetensors U64 (torch keeps it in int64, spec 1.5)."""
    return torch.uint64 if spec.meta.get("storage") == "uint64" else spec.dtype


def linear_scheme_named(name: str | None) -> Scheme:
    """The declared scheme `name` (conf/scheme; None: the schema's quantize.linear_scheme)."""
    from quantfw.config.declared import declarations
    from quantfw.config.schema import QuantizeConfig

    name = name or QuantizeConfig.linear_scheme
    schemes = declarations("scheme")
    if name not in schemes:
        raise ConfigError(f"quantize.linear_scheme={name}: not a declared scheme (conf/scheme: {', '.join(schemes)})")
    return Scheme.from_config(schemes[name])


def weight_calibration_metadata(flags: Mapping, records: list[dict], data: dict | None) -> dict:
    """The checkpoint-metadata entry of a data-driven weight observer, kept small: the observer
    and its parameters, the calibration data and coverage, per-layer lists of the experts that
    fell back, and each expert's mean learned clip ratio (not every channel)."""
    fallback: dict[str, dict[str, list[int]]] = {}
    reasons: dict[str, int] = {}
    clip: dict[str, dict[str, list]] = {}
    for r in records:
        layer = str(r["layer"])
        if r["fallback"]:
            fallback.setdefault(layer, {}).setdefault(r["proj"], []).append(r["expert"])
            kind = "no calibration inputs" if r["tokens"] == 0 else "too few calibration tokens"
            reasons[kind] = reasons.get(kind, 0) + 1
        if r["clip_ratio_mean"] is not None:
            clip.setdefault(layer, {}).setdefault(r["proj"], []).append([r["expert"], r["clip_ratio_mean"]])
    meta: dict = {
        **observers.data_params(flags),
        "data": data or {"source": "none: no calibration inputs"},
        "projections": len(records),
        "data_driven": sum(1 for r in records if not r["fallback"]),
        "tokens_used": sum(r["tokens"] for r in records if not r["fallback"]),
        "fallback": {"observer": observers.param(flags, "fallback_observer"), "count": sum(reasons.values())},
    }
    meta["fallback"].update(reasons=reasons, experts=fallback)
    if clip:
        meta["clip_ratio_mean"] = clip  # layer -> proj -> [[expert, mean ratio over channels], ...]
    return meta
