"""One float projection -> the format's tensors: quantize with the scheme's observer, encode
with the format's registered encoders (`ExpertQuantizer`, both paths), name with the
checkpoint's expert keys (`ExpertEncoder`, the converter).

Routed experts follow the scheme; non-expert linears written W8A8 use the format's own W8A8
tensors (one projection, role w2: N and K as they are).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from quantfw.errors import CheckpointError, ConfigError
from quantfw.formats.encoders import check_finite, encode_role, fusable
from quantfw.formats.format import Format
from quantfw.io import metadata
from quantfw.io.experts import ROLE_OF, MoEModel, key_of, projection_specs
from quantfw.layout.spec import Dims, ParamSpec, instantiate
from quantfw.quantize import observers
from quantfw.quantize.inputs import CalibrationInputs
from quantfw.quantize.record import ExpertRecord
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


class ExpertQuantizer:
    """Expert projections of one scheme in a format's declared tensors, the one place both paths
    quantize through (the in-memory `quantize_experts` and the converter): the calibration inputs
    a data-driven observer needs, the observer the flags select, the format's encoders, and the
    projection's ExpertRecord.

    specs: projection -> {tensor name: spec} of the weights it is given (one expert's, or a stack
    of experts with stacked specs); rows: each projection's weight rows N, for the encodings the
    quantize kernel can compute with q (quantize/fused.py; None: none)."""

    def __init__(
        self,
        flags: Mapping,
        specs: Mapping[str, Mapping[str, ParamSpec]],
        where: str,
        rows: Mapping[str, int] | None = None,
    ):
        self.specs, self.where = specs, where
        self.needs_data = observers.needs_data(flags)
        self.flags = {
            p: {**flags, "encodings": fusable(s, rows[p])} if rows is not None else dict(flags)
            for p, s in specs.items()
        }

    def projection(
        self,
        proj: str,
        w: torch.Tensor,
        src: str,
        *,
        layer: int | None = None,
        expert: int | None = None,
        inputs: CalibrationInputs | None = None,
        alpha: torch.Tensor | None = None,
        fp8=None,
        key: Callable[[str], str] = str,
        name: str | None = None,
    ) -> tuple[dict[str, torch.Tensor], ExpertRecord | None]:
        """({key(tensor name): tensor}, record or None) of expert `expert`'s projection w [N, K]
        (or a stack [E, N, K] with expert None, data-free observers only). A data-driven observer
        gets `inputs(role, expert)`; alpha None: the encoder's alpha = 1; fp8: w is an FP8 weight
        with these block scales; src names the weight's source, `name` (default proj) the
        projection in the format's errors."""
        x = None
        if self.needs_data and inputs is not None and expert is not None:
            x = inputs(ROLE_OF.get(proj, proj), expert)
        qw = _quantize(w, self.flags[proj], x, src, fp8)
        record = ExpertRecord.of(qw, x, layer, expert, proj) if self.needs_data else None
        del x
        specs = self.specs[proj]
        out = {}
        for tensor, t in encode_role(specs, qw, alpha, f"{self.where} {name or proj}").items():
            check_finite(src, key(tensor), t)
            out[key(tensor)] = t.view(torch.uint64) if _stored_dtype(specs[tensor]) == torch.uint64 else t
        return out, record


class ExpertEncoder:
    """The converter's quantizer: one expert projection or non-expert linear of a checkpoint ->
    its on-disk tensors under the checkpoint's keys, with their metadata types."""

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
        flags = compute_flags(scheme.flags, compute_dtype)
        specs = projection_specs(fmt, scheme, dims)
        unwritable = sorted({s for p in specs.values() for s, spec in p.items() if not spec.meta.get("encode")})
        if unwritable:
            raise ConfigError(
                f"{fmt.where} declares no encode: for {unwritable}: it is read-only "
                "(quantize to format=msmodelslim or format=compressed_tensors)"
            )
        self.specs = specs  # proj -> {suffix: spec} of one expert's on-disk tensors
        self.quantizer = ExpertQuantizer(flags, specs, fmt.where, {p: model.float_shape(p)[0] for p in specs})
        self.qtype = metadata.expert_type(scheme)
        self.needs_data = self.quantizer.needs_data
        # Non-expert linears: the linear scheme's layout flags with the experts' observer.
        self.linear_scheme = linear_scheme or linear_scheme_named(None)
        self.linear_flags = {**flags, **self.linear_scheme.layout_flags()}
        self.linear_type = metadata.quant_type(self.linear_flags["weight_bits"])

    def expert(
        self,
        prefix: str,
        expert: int,
        proj: str,
        w: torch.Tensor,
        inputs: CalibrationInputs | None,
        alpha: torch.Tensor | None,
        src: str,
        fp8=None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, str], ExpertRecord | None]:
        """(tensors, per-tensor types, weight-observer record or None) of one expert projection."""
        out, record = self.quantizer.projection(
            proj,
            w,
            src,
            layer=layer_of(prefix),
            expert=expert,
            inputs=inputs,
            alpha=alpha,
            fp8=fp8,
            key=lambda suffix: key_of(prefix, expert, self.model, proj, suffix),
            name=f"{prefix}.{expert}.{proj}",
        )
        return out, dict.fromkeys(out, self.qtype), record

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
        return [(f"{module}.{suffix}", _stored_dtype(spec), spec.shape) for suffix, spec in specs.items()]

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
        quantizer = ExpertQuantizer(self.linear_flags, {module: self.linear_specs(*w.shape)}, self.fmt.where)
        out, _ = quantizer.projection(module, w, src, fp8=fp8, key=lambda suffix: f"{module}.{suffix}")
        return out, dict.fromkeys(out, self.linear_type)


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
