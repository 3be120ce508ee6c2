"""Which input tensors a conversion quantizes, and how: routed experts (per-expert keys or the
transformers-5 fused `experts.gate_up_proj` / `experts.down_proj`), non-expert linears matched by
the recipe's `quantize.targets` / `quantize.ignore` regexes, or pass-through."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from quantfw.errors import CheckpointError, ConfigError
from quantfw.io.experts import FUSED_RE, MoEModel, parse_expert_key
from quantfw.io.reader import CheckpointReader

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Part:
    """One float projection to quantize: an expert's (prefix, expert, proj) or a linear (proj 'linear')."""

    prefix: str
    expert: int | None
    proj: str
    weight: torch.Tensor
    src: str  # for error messages: file and tensor


class TensorRouter:
    def __init__(
        self, reader: CheckpointReader, model: MoEModel, targets: Sequence[str], ignore: Sequence[str]
    ):
        self.reader, self.model = reader, model
        self.targets, self.ignore = list(targets), list(ignore)
        for pat in (*self.targets, *self.ignore):
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"quantize.targets/ignore: invalid regex {pat!r} ({e})") from None

    def check_float(self, key: str, t: torch.Tensor, shape: tuple[int, ...], shard: str) -> None:
        where = self.reader.folder / shard
        if t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{where}: tensor '{key}' has dtype {t.dtype}, expected bf16, fp16 or fp32")
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{where}: tensor '{key}' has shape {list(t.shape)}, expected {list(shape)} (from config.json)"
            )
        # NaN / Inf are caught by quantize_weight from its amax (no extra pass here).

    def jobs(self, shard: str) -> Iterator[tuple[str, torch.Tensor, list[Part]]]:
        """(key, tensor, parts to quantize, or [] to pass the tensor through) in key order."""
        E = self.model.num_experts
        for key, t in self.reader.iter_shard(shard):
            src = f"{self.reader.folder / shard}: tensor '{key}'"
            parsed = parse_expert_key(key, self.model)
            fused = FUSED_RE.match(key)
            if parsed:
                prefix, _, expert, proj, suffix = parsed
                if suffix != "weight":
                    raise CheckpointError(
                        f"{src}: routed-expert tensor is not supported (only .weight; expert biases are not)"
                    )
                self.check_float(key, t, self.model.float_shape(proj), shard)
                yield key, t, [Part(prefix, expert, proj, t, src)]
            elif fused:
                prefix, name = fused["prefix"], fused["proj"]
                H, I = self.model.hidden_size, self.model.moe_intermediate_size
                shape = (E, 2 * I, H) if name == "gate_up_proj" else (E, H, I)
                self.check_float(key, t, shape, shard)
                parts = []
                for e in range(E):
                    where = f"{src} (expert {e})"
                    if name == "gate_up_proj":
                        parts += [
                            Part(prefix, e, "gate", t[e, :I], where),
                            Part(prefix, e, "up", t[e, I:], where),
                        ]
                    else:
                        parts.append(Part(prefix, e, "down", t[e], where))
                yield key, t, parts
            elif self.is_target_linear(key, t):
                yield key, t, [Part(key[: -len(".weight")], None, "linear", t, src)]
            else:
                yield key, t, []

    def is_target_linear(self, key: str, t: torch.Tensor) -> bool:
        if not self.targets or not key.endswith(".weight") or t.dim() != 2 or t.dtype not in FLOAT_DTYPES:
            return False
        module = key[: -len(".weight")]
        return any(re.search(p, module) for p in self.targets) and not any(
            re.search(p, module) for p in self.ignore
        )
