"""Which input tensors a conversion quantizes, and how: routed experts (per-expert keys or the
transformers-5 fused `experts.gate_up_proj` / `experts.down_proj`), non-expert linears matched by
the recipe's `quantize.targets` / `quantize.ignore` regexes, or pass-through.

FP8 releases (spec section 12): every float8_e4m3fn tensor is dequantized (fp32, quantfw.io.fp8)
as it streams by, with its `_scale_inv` companion read from whichever shard holds it; the
companions are consumed, never written. An FP8 tensor that is not quantized passes through as
bf16, so nothing leaves as FP8 under a config that no longer describes it.

The MTP layers (DeepSeek `num_nextn_predict_layers`, indices num_hidden_layers and up) follow
the recipe's `quantize.mtp`: `quantize` treats them as any other layer (routed experts per the
scheme, linears per targets/ignore), `drop` leaves them out of the output.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from quantfw.errors import CheckpointError, ConfigError
from quantfw.io import fp8
from quantfw.io.experts import FUSED_RE, PROJS, ROLE_OF, MoEModel, parse_expert_key
from quantfw.io.reader import CheckpointReader

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MTP_MODES = ("quantize", "drop")
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# The MLP linears of a layer without routed experts, written per its `layers` choice.
DENSE_MLP_RE = re.compile(r"(^|\.)mlp\.")
# transformers-5 fused expert tensors: the role whose projections' rows each one stacks.
FUSED_ROLE = {"gate_up_proj": "w13", "down_proj": "w2"}


@dataclass
class Part:
    """One float projection to quantize: an expert's (prefix, expert, proj) or a linear (proj 'linear')."""

    prefix: str
    expert: int | None
    proj: str
    weight: torch.Tensor
    src: str  # for error messages: file and tensor
    # An FP8 weight left undequantized: its block scales, so a data-free observer can dequantize
    # inside its own kernel (quantize_weight's `fp8`); None for float weights.
    fp8_scales: fp8.BlockScales | None = None


@dataclass(frozen=True)
class Route:
    """What one input tensor becomes: kind scale (consumed with its FP8 weight), drop, expert,
    fused (transformers-5 stacked experts), linear (quantized) or pass (written as it is, FP8 as
    bf16). raw_fp8: the FP8 weight goes to the quantizer with its block scales."""

    kind: str
    was_fp8: bool = False
    parsed: tuple | None = None
    fused: tuple[str, str] | None = None
    raw_fp8: bool = False


def fused_projs(model: MoEModel, name: str) -> list[tuple[str, int]]:
    """The projections one expert's slice of fused tensor `name` stacks, in order, with their rows."""
    role = FUSED_ROLE[name]
    return [(p, model.float_shape(p)[0]) for p in PROJS if ROLE_OF[p] == role]


def mtp_layers(config: dict) -> range:
    """Layer indices of the MTP modules (DeepSeek: [num_hidden_layers, + num_nextn_predict_layers))."""
    n, extra = config.get("num_hidden_layers"), config.get("num_nextn_predict_layers") or 0
    return range(n, n + extra) if isinstance(n, int) and isinstance(extra, int) else range(0)


class TensorRouter:
    def __init__(
        self,
        reader: CheckpointReader,
        model: MoEModel,
        targets: Sequence[str],
        ignore: Sequence[str],
        mtp: str = "quantize",
        dense_layers: Sequence[int] = (),
    ):
        self.reader, self.model = reader, model
        self.dense_layers = set(dense_layers)  # layers whose MLP linears a `layers` choice makes W8A8
        config = reader.config()
        self.block = fp8.block_size(config, str(reader.folder / "config.json"))
        if mtp not in MTP_MODES:
            raise ConfigError(f"quantize.mtp={mtp!r} (allowed: {', '.join(MTP_MODES)})")
        self.mtp = mtp
        self.mtp_layers = mtp_layers(config)
        self.targets, self.ignore = list(targets), list(ignore)
        for pat in (*self.targets, *self.ignore):
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"quantize.targets/ignore: invalid regex {pat!r} ({e})") from None

    def check_float(self, key: str, t: torch.Tensor, shape: tuple[int, ...], shard: str) -> None:
        if t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{self.reader.folder / shard}: tensor '{key}' has dtype {t.dtype}, expected bf16, fp16 or fp32"
            )
        self.check_shape(key, t, shape, shard)

    def check_shape(self, key: str, t: torch.Tensor, shape: tuple[int, ...], shard: str) -> None:
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{self.reader.folder / shard}: tensor '{key}' has shape {list(t.shape)}, expected {list(shape)} (from config.json)"
            )
        # NaN / Inf are caught by quantize_weight from its amax (no extra pass here).

    def output_config(self, config: dict) -> dict:
        """config.json of the output: without the dropped MTP layers."""
        if self.mtp == "drop" and self.mtp_layers:
            return {**config, "num_nextn_predict_layers": 0}
        return config

    def dropped(self, key: str) -> bool:
        m = LAYER_RE.search(key)
        return self.mtp == "drop" and m is not None and int(m[1]) in self.mtp_layers

    def check_scale_owner(self, key: str, src: str) -> None:
        """A `_scale_inv` is consumed with its FP8 weight; one without one is an error."""
        weight = fp8.weight_of(key)
        if weight not in self.reader:
            raise CheckpointError(f"{src}: scale without its FP8 weight '{weight}'")
        dtype = self.reader.info(weight).dtype
        if dtype not in fp8.FP8_DTYPES:
            raise CheckpointError(
                f"{src}: scale of '{weight}', which has dtype {dtype}, not float8_e4m3fn (a stale scale_inv)"
            )

    def route(self, key: str, dtype: torch.dtype, dim: int) -> Route:
        """What tensor `key` becomes, from its header alone (dtype, rank): the one place this is
        decided, for the conversion (`jobs`) and for the shard's header written ahead of its data."""
        if fp8.is_scale_key(key):
            return Route("scale")
        if self.dropped(key):
            return Route("drop")
        was_fp8 = dtype in fp8.FP8_DTYPES
        parsed = parse_expert_key(key, self.model)
        if parsed:
            # an FP8 2-D expert projection goes to the quantizer undequantized, with its scales
            return Route("expert", was_fp8, parsed, raw_fp8=was_fp8 and dim == 2)
        fused = FUSED_RE.match(key)
        if fused:
            return Route("fused", was_fp8, fused=(fused["prefix"], fused["proj"]))
        if self.is_target_linear(key, dtype, dim):
            return Route("linear", was_fp8, raw_fp8=was_fp8)
        return Route("pass", was_fp8)

    def jobs(self, shard: str) -> Iterator[tuple[str, torch.Tensor, list[Part]]]:
        """(key, tensor, parts to quantize, or [] to pass the tensor through) in key order."""
        E = self.model.num_experts
        for key, t in self.reader.iter_shard(shard):
            src = f"{self.reader.folder / shard}: tensor '{key}'"
            r = self.route(key, t.dtype, t.dim())
            if r.kind == "scale":
                self.check_scale_owner(key, src)
                continue
            if r.kind == "drop":
                continue
            scales = fp8.block_scales(self.reader, key, self.block) if r.raw_fp8 else None
            if r.was_fp8 and not r.raw_fp8:
                t = fp8.float_of(self.reader, key, t, self.block)
            if r.kind == "expert":
                prefix, _, expert, proj, suffix = r.parsed
                self.check_expert_suffix(suffix, src)
                if scales is None:
                    self.check_float(key, t, self.model.float_shape(proj), shard)
                else:
                    self.check_shape(key, t, self.model.float_shape(proj), shard)
                yield key, t, [Part(prefix, expert, proj, t, src, scales)]
            elif r.kind == "fused":
                prefix, name = r.fused
                projs = fused_projs(self.model, name)
                rows = [n for _, n in projs]
                self.check_float(key, t, (E, sum(rows), self.model.float_shape(projs[0][0])[1]), shard)
                parts = []
                for e in range(E):
                    parts += [
                        Part(prefix, e, p, w, f"{src} (expert {e})")
                        for (p, _), w in zip(projs, t[e].split(rows), strict=True)
                    ]
                yield key, t, parts
            elif r.kind == "linear":
                yield key, t, [Part(key[: -len(".weight")], None, "linear", t, src, scales)]
            else:
                yield key, (t.to(torch.bfloat16) if r.was_fp8 else t), []

    @staticmethod
    def check_expert_suffix(suffix: str, src: str) -> None:
        if suffix != "weight":
            raise CheckpointError(
                f"{src}: routed-expert tensor is not supported (only .weight; expert biases are not)"
            )

    def is_target_linear(self, key: str, dtype: torch.dtype, dim: int) -> bool:
        if (
            not (self.targets or self.dense_layers)
            or not key.endswith(".weight")
            or dim != 2
            or dtype not in (*FLOAT_DTYPES, *fp8.FP8_DTYPES)
        ):
            return False
        module = key[: -len(".weight")]
        layer = LAYER_RE.search(key)
        chosen = layer is not None and int(layer[1]) in self.dense_layers and DENSE_MLP_RE.search(module)
        return (chosen or any(re.search(p, module) for p in self.targets)) and not any(
            re.search(p, module) for p in self.ignore
        )

    def layers(self) -> tuple[set[int], set[int]]:
        """(layers with routed experts, every layer index) among the input's keys."""
        moe, every = set(), set()
        for key in self.reader.keys():
            m = LAYER_RE.search(key)
            if m is None:
                continue
            every.add(int(m[1]))
            if parse_expert_key(key, self.model) or FUSED_RE.match(key):
                moe.add(int(m[1]))
        return moe, every
