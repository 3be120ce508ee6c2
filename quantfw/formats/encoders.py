"""Writers of on-disk tensors: each `encode:` name in a format declaration turns a quantized
weight into the declared tensor. Shapes and dtypes come from the declaration, so the same
encoder serves msModelSlim (fp32 scales) and compressed-tensors (u64 scales)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from quantfw import ops
from quantfw.errors import CheckpointError, LayoutError
from quantfw.layout.spec import ParamSpec
from quantfw.quantize import primitives as P
from quantfw.quantize.weights import QuantizedWeight
from quantfw.registry import Registry

Encoder = Callable[[ParamSpec, QuantizedWeight, "torch.Tensor | None"], torch.Tensor]
ENCODERS: Registry[Encoder] = Registry("encoder")  # plugins: entry-point group quantfw.encoders
encoder = ENCODERS.register


def get(name: str, where: str) -> Encoder:
    return ENCODERS.get(name, where)


@encoder("q")
def _q(spec, qw, alpha):
    """Integer weights; packed two per byte along N when the declaration halves the rows."""
    if packs(spec, qw):
        packed = qw.encoded.get("pack_int4")
        return ops.pack_int4(qw.q) if packed is None else packed
    return qw.q.to(torch.int8)


def packs(spec: ParamSpec, qw: QuantizedWeight) -> bool:
    return spec.shape[-2] * 2 == qw.q.shape[-2]


@encoder("s1")
def _s1(spec, qw, alpha):
    """Per-channel scale as [.., N, 1]; u64-encoded when declared uint64."""
    s = qw.s1.float().unsqueeze(-1)
    return ops.encode_scale_u64(s) if spec.dtype == torch.int64 else s


@encoder("s2")
def _s2(spec, qw, alpha):
    return qw.s2.float()


@encoder("zeros")
def _zeros(spec, qw, alpha):
    return torch.zeros(spec.shape, dtype=spec.dtype)


@encoder("scale_bias")
def _scale_bias(spec, qw, alpha):
    """msModelSlim scale_bias: 8 * sums of the bf16-dequantized weight over spec.shape[-1] K-chunks."""
    return P.scale_bias_msmodelslim(qw.q, qw.s1, qw.s2, chunks=spec.shape[-1])


@encoder("bias")
def _bias(spec, qw, alpha):
    """The A8W4 bias [N] = 8*sum_k s*q, computed in bf16 as the cann-recipes converter does
    (rows that overflow it are recomputed in fp64)."""
    if qw.s2 is not None:
        raise LayoutError("encode 'bias' stores per-channel int4 only; this weight has per-group scales")
    dtype = (qw.info or {}).get("compute_dtype", "float32")
    sums = qw.encoded.get("a8w4_bias") if dtype == "float32" else None
    return P.a8w4_bias(qw.q, qw.s1, sum_dtype=getattr(torch, dtype), sums=sums)


@encoder("alpha")
def _alpha(spec, qw, alpha):
    """Per-expert activation clip factor (1 = no clip)."""
    if alpha is None:
        return torch.ones(spec.shape, dtype=torch.float32)
    return alpha.float().reshape(spec.shape)


# Encoders whose work a fused quantize kernel can do (quantize/fused.py ENCODINGS), by encode name.
_FUSABLE = {"q": "pack_int4", "bias": "a8w4_bias"}


def fusable(specs: Mapping[str, ParamSpec], rows: int) -> tuple[str, ...]:
    """The fused encodings the declared tensors of one role (weights of `rows` rows) would use."""
    out = []
    for spec in specs.values():
        name = _FUSABLE.get(spec.meta.get("encode", ""))
        if name == "pack_int4" and spec.shape[-2] * 2 != rows:
            continue
        if name and name not in out:
            out.append(name)
    return tuple(out)


def encode_role(
    specs: Mapping[str, ParamSpec], qw: QuantizedWeight, alpha: torch.Tensor | None, where: str
) -> dict[str, torch.Tensor]:
    """All declared tensors of one role from its quantized weight (leading dims as qw's)."""
    out = {}
    for name, spec in specs.items():
        t = get(spec.meta.get("encode", ""), f"{where}: {name}")(spec, qw, alpha)
        if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
            raise LayoutError(
                f"{where}: encoder '{spec.meta.get('encode')}' made {name} {list(t.shape)} {t.dtype}, declared {spec.describe()}"
            )
        out[name] = t
    return out


def check_finite(src: str, key: str, t: torch.Tensor) -> None:
    """The last guard before `key` is written: a float tensor (bias, scale, alpha) must be finite.
    Weights are integers; u64-encoded scales are checked as floats by the caller."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(
            f"{src}: output tensor '{key}' would hold {bad} non-finite value(s) of {t.numel()} "
            "(the weight is too large for an fp32 bias or scale); quantize writes finite values only"
        )
