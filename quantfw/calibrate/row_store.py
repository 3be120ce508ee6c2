"""Where one MoE layer's alpha-search rows wait for the layer's search.

The search visits every searched expert about three times (its starting error, two sweeps, and
the held-out test of a clipped expert), each time with the expert's rows (h, ref) and its int4
down-projection. The rows grow with the calibration tokens (0.74 GB of fp32 at 2048 tokens and
DeepSeek-V3 dims) and a packed down-projection is ~7 MB per expert, so a store keeps them in memory
up to calibration.search_memory_mb (each rank its share) and writes the rest to the work dir, one
file per expert, which the search reads back at each visit: the same tensors, so the same alphas.
A spilled expert travels to another rank's search as its file name (the work dir is shared).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from quantfw.calibrate.alpha import ExpertRows, IntWeight
from quantfw.quantize import primitives

__all__ = ["CompactWeight", "RowStore", "SpilledRows", "discard"]

FOLDER = "search-rows"


class CompactWeight:
    """A quantized weight held small: integer codes in [-8, 7] packed two per byte (else kept as
    they are); `dequantize()` returns exactly QuantizedWeight.dequantize(). Plain tensors: it
    travels between ranks."""

    def __init__(self, q: torch.Tensor, s1, s2, packed: bool | None = None):
        if packed is None:
            packed = (
                q.dtype == torch.int8 and q.shape[-1] % 2 == 0 and -8 <= int(q.min()) <= int(q.max()) <= 7
            )
            if packed:
                u = (q + 8).to(torch.uint8)
                q = u[..., 0::2] | (u[..., 1::2] << 4)
        self.q, self.s1, self.s2, self.packed = q, s1, s2, packed
        self.nbytes = sum(t.numel() * t.element_size() for t in (q, s1, s2) if t is not None)

    @classmethod
    def of(cls, qw) -> CompactWeight:
        return cls(qw.q, qw.s1, qw.s2)

    def _codes(self) -> torch.Tensor:
        q = self.q
        if self.packed:
            # int8 views of the nibbles, not a widening per step: the search unpacks an expert
            # about three times
            lo, hi = (q & 15).view(torch.int8), (q >> 4).view(torch.int8)
            q = torch.stack([lo, hi], -1).flatten(-2).sub_(8)
        return q

    def dequantize(self) -> torch.Tensor:
        return primitives.dequantize(self._codes(), self.s1, self.s2)

    def operand(self) -> IntWeight | torch.Tensor:
        """The one expert's weight as the alpha search multiplies with it: integer codes and
        per-channel scales when it has them, else dequantized fp32 [N, K]."""
        if self.s2 is None and self.q.dtype in (torch.int8, torch.uint8):
            return IntWeight(self._codes()[0], self.s1[0].to(torch.float32))
        return self.dequantize()[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"w2.q": self.q, "w2.packed": torch.tensor(int(self.packed))}
        out.update({f"w2.{k}": t for k, t in (("s1", self.s1), ("s2", self.s2)) if t is not None})
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> CompactWeight:
        return cls(t["w2.q"], t.get("w2.s1"), t.get("w2.s2"), packed=bool(t["w2.packed"]))


def _nbytes(rows: ExpertRows) -> int:
    own = sum(t.numel() * t.element_size() for t in (rows.h, rows.ref, rows.tokens, rows.weight))
    return own + rows.w2_deq.nbytes


@dataclass
class SpilledRows:
    """An expert's search rows in a work-dir file; tokens and weights stay (the search indexes the
    layer's tokens before it visits any expert)."""

    path: Path
    tokens: torch.Tensor
    weight: torch.Tensor

    def load(self) -> ExpertRows:
        t = load_bytes(self.path.read_bytes())  # a plain read: nothing of the file stays mapped
        return ExpertRows(t["h"], t["ref"], CompactWeight.from_tensors(t), self.tokens, self.weight)


class RowStore:
    """One layer's search rows on one rank (each with a CompactWeight w2): held while they fit in
    `budget` bytes, else spilled to `folder`."""

    def __init__(self, layer: int, budget: int, folder: Path):
        self.layer, self.budget, self.folder, self.used = layer, budget, folder, 0

    def keep(self, e: int, rows: ExpertRows) -> ExpertRows | SpilledRows:
        size = _nbytes(rows)
        if self.used + size <= self.budget:
            self.used += size
            return rows
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"layer-{self.layer:04d}-expert-{e:04d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({"h": rows.h, "ref": rows.ref, **rows.w2_deq.tensors()}, str(tmp))
        os.replace(tmp, path)
        return SpilledRows(path, rows.tokens, rows.weight)


def discard(rows: list) -> None:
    """Delete the files of a searched layer's spilled rows."""
    for r in rows:
        if isinstance(r, SpilledRows):
            r.path.unlink(missing_ok=True)
