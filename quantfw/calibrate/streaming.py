"""Routed experts of one layer computed a block of experts at a time, weights read from the shards.

`StreamingExperts` stands in for a MoE block's experts module (the quantfw.moe contract). A layer
runs twice: first it records every batch's expert inputs and routing (returning zeros), then
`run_blocks` reads the expert weights block by block, computes every batch's routed outputs and
feeds the capture, and the second pass returns those outputs. So each expert's weights are read
once per layer, and the sums happen exactly as in `quantfw.moe.reference.FloatMoE` (same rows, same
matmuls, experts added in order), which keeps the result bit-identical to the whole-model path.

`SpilledInputs` is the data-driven observers' view of a finished layer: it reads the layer's spill
(MoE inputs, routing, the kept rows) on demand and recomputes an expert's w2 inputs from its float
gate/up weights, read again for that one expert.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from quantfw import ops
from quantfw.calibrate.experts import LayerCapture
from quantfw.calibrate.stages import STAGES
from quantfw.errors import CalibrationError, CheckpointError
from quantfw.io.experts import FUSED_RE, MoEModel, key_of
from quantfw.io.fp8 import block_size, read_float
from quantfw.io.reader import CheckpointReader

__all__ = ["ExpertSource", "SpilledInputs", "StreamingExperts", "read_blocks", "run_blocks"]


class ExpertSource:
    """Float w13 [B, 2I, H] (gate rows then up rows) and w2 [B, H, I] of one layer's experts
    [start, stop), fp32, FP8 dequantized, from per-expert keys or transformers-5 fused keys."""

    def __init__(self, reader: CheckpointReader, model: MoEModel, layer: int, prefix: str | None):
        self.reader, self.model, self.layer, self.prefix = reader, model, layer, prefix
        self.fp8_block = block_size(reader.config(), str(reader.folder / "config.json"))
        self.fused = {}
        if prefix is None:
            self.fused = {
                m["proj"]: k for k in reader.keys() if (m := FUSED_RE.match(k)) and int(m["layer"]) == layer
            }
            if not {"gate_up_proj", "down_proj"} <= self.fused.keys():
                raise CheckpointError(f"{reader.folder}: layer {layer} has no routed-expert float weights")

    def _fused(self, proj: str, start: int, stop: int) -> torch.Tensor:
        key = self.fused[proj]
        with safe_open(self.reader.folder / self.reader.shard_of(key), framework="pt") as f:
            return f.get_slice(key)[start:stop].float()

    def down(self, e: int) -> torch.Tensor:
        """Expert e's float w2 [H, I] alone (the alpha search rebuilds it on demand)."""
        if self.fused:
            return self._fused("down_proj", e, e + 1)[0]
        return read_float(
            self.reader, key_of(self.prefix, e, self.model, "down", "weight"), self.fp8_block
        ).float()

    def _key(self, e: int, proj: str) -> str:
        key = key_of(self.prefix, e, self.model, proj, "weight")
        if key not in self.reader:
            raise CheckpointError(f"{self.reader.folder}: float expert weight '{key}' missing")
        return key

    def _proj_into(self, e: int, proj: str, out: torch.Tensor) -> None:
        key = self._key(e, proj)
        shape = tuple(self.reader.info(key).shape)
        if shape != tuple(out.shape):
            raise CheckpointError(
                f"{self.reader.folder}: float expert weight '{key}' has shape {list(shape)}, "
                f"expected {list(out.shape)} (the layer's other experts)"
            )
        read_float(self.reader, key, self.fp8_block, out)

    def block(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        with STAGES("read+dequant"):
            if self.fused:
                return self._fused("gate_up_proj", start, stop), self._fused("down_proj", start, stop)
            # Dequantized straight into the block, one projection at a time: the block is never held
            # twice (a stack of per-expert copies would double it: 2.8 GB more for 16 experts at
            # DeepSeek-V3 dims) and no per-projection fp32 copy is made.
            inter, hidden = self.reader.info(self._key(start, "gate")).shape
            w13 = torch.empty(stop - start, 2 * inter, hidden)
            w2 = torch.empty(stop - start, hidden, inter)
            for j, e in enumerate(range(start, stop)):
                self._proj_into(e, "gate", w13[j, :inter])
                self._proj_into(e, "up", w13[j, inter:])
                self._proj_into(e, "down", w2[j])
            return w13, w2


class StreamingExperts(nn.Module):
    """Experts module without weights: records (hidden, topk_weights, topk_ids) per call, then
    replays the outputs `run_blocks` computed for those calls, in the same order."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.outputs: list[torch.Tensor] | None = None
        self._next = 0

    def reset(self) -> None:
        self.calls, self.outputs, self._next = [], None, 0

    def replay(self, outputs: list[torch.Tensor]) -> None:
        self.outputs, self._next = outputs, 0

    def forward(
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        if self.outputs is None:
            self.calls.append((hidden.detach().to(torch.float32), topk_weights.detach(), topk_ids.detach()))
            return torch.zeros_like(hidden)
        i, self._next = self._next, self._next + 1
        if i >= len(self.calls) or not torch.equal(self.calls[i][2], topk_ids):
            raise CalibrationError(f"layer {self.layer}: routing differs between the two passes of batch {i}")
        return self.outputs[i].to(hidden.dtype)


def _expert_rows(ids: torch.Tensor, e: int, all_experts: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows the capture sees, rows routed to e) as bool masks over a batch's tokens."""
    routed = (ids == e).any(dim=-1)
    return (torch.ones_like(routed) if all_experts else routed), routed


def run_blocks(
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    source: ExpertSource,
    num_experts: int,
    block: int,
    capture: LayerCapture | None,
    all_experts: bool = False,
    on_block: Callable[[range, torch.Tensor, torch.Tensor], None] | None = None,
    blocks: Sequence[range] | None = None,
    add: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
) -> list[torch.Tensor]:
    """Routed expert outputs fp32 [T_b, H] of every recorded call; the capture gets each expert's
    rows (token numbers run over the calls in order, as the whole-model hook numbers them) and
    `on_block(experts, w13, w2)` runs once a block's captures are complete. Expert parallel
    (quantfw.parallel.calibration): `blocks` are this process's expert ranges (default: all, by
    `block`) and `add(expert, call, rows, y)` takes each expert's weighted output rows instead of
    the returned sums."""
    outs = [torch.zeros_like(x) for x, _, _ in calls]
    starts = [0]
    for x, _, _ in calls:
        starts.append(starts[-1] + x.shape[0])
    for experts, w13, w2 in read_blocks(source, num_experts, block, blocks):
        with STAGES("experts forward"):
            _block_outputs(calls, starts, experts, w13, w2, outs, capture, all_experts, add)
        if on_block is not None:
            on_block(experts, w13, w2)
        del w13, w2
    return outs


def read_blocks(source: ExpertSource, num_experts: int, block: int, blocks: Sequence[range] | None = None):
    """Yield (experts, w13, w2) block by block (`blocks`: the expert ranges, default all by
    `block`). One reader thread works a block ahead (file reads and the FP8 products release the
    GIL), so reading and dequantizing overlap the caller's compute; at most two blocks are in memory."""
    if blocks is None:
        blocks = [range(f, min(num_experts, f + block)) for f in range(0, num_experts, block)]
    blocks = list(blocks)
    with ThreadPoolExecutor(1, thread_name_prefix="quantfw-experts") as pool:
        ahead = pool.submit(source.block, blocks[0].start, blocks[0].stop) if blocks else None
        for n, experts in enumerate(blocks):
            with STAGES("wait for weights"):
                w13, w2 = ahead.result()
            if n + 1 < len(blocks):
                ahead = pool.submit(source.block, blocks[n + 1].start, blocks[n + 1].stop)
            yield experts, w13, w2
            del w13, w2


def _block_outputs(calls, starts, experts: range, w13, w2, outs, capture, all_experts, add=None) -> None:
    """Add the routed outputs of `experts` (weights w13 [B, 2I, H], w2 [B, H, I]) to `outs` (or
    hand each expert's weighted rows to `add(expert, call, rows, y)`) and their rows to the capture."""
    inter = w13.shape[1] // 2
    for j, e in enumerate(experts):
        for b, (x, weights, ids) in enumerate(calls):
            seen, routed = _expert_rows(ids, e, all_experts)
            if not seen.any():
                continue
            w = (weights.to(torch.float32) * (ids == e)).sum(-1)
            h = x[routed] @ w13[j].T if routed.any() else None
            if capture is not None:
                number = torch.arange(starts[b], starts[b + 1])
                if all_experts:
                    capture.add(e, x @ w13[j].T, x, tokens=number, weights=w, routed=routed)
                else:
                    capture.add(e, h, x[routed], tokens=number[routed], weights=w[routed])
            if h is not None:
                y = (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[j].t()
                rows = routed.nonzero().squeeze(1)
                if add is None:
                    outs[b].index_add_(0, rows, y * w[routed, None])
                else:
                    add(e, b, rows, y * w[routed, None])


class _SpillCache:
    """The tensors of the last spill read (one layer's MoE inputs), shared by the observer threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.path: Path | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def get(self, path: Path) -> dict[str, torch.Tensor]:
        with self.lock:
            if self.path != path:
                self.tensors = {}
                with safe_open(path, framework="pt") as f:
                    self.tensors = {k: f.get_tensor(k) for k in f.keys()}
                self.path = path
            return self.tensors


_CACHE = _SpillCache()


class SpilledInputs:
    """`inputs(role, expert)` of one calibrated layer from its spill file (CalibrationInputs):
    w13 -> the kept hidden rows x [M, H]; w2 -> swiglu(x @ w13[e].T), the matmul redone per batch
    on the same rows as during calibration so the values are the captured ones."""

    def __init__(self, path: Path, source: ExpertSource, all_experts: bool = False):
        self.path, self.source, self.all_experts = Path(path), source, all_experts

    def _kept(self, t: dict[str, torch.Tensor], e: int) -> torch.Tensor:
        off = t["kept_offsets"]
        return t["kept_tokens"][int(off[e]) : int(off[e + 1])]

    def __call__(self, role: str, expert: int) -> torch.Tensor | None:
        t = _CACHE.get(self.path)
        kept = self._kept(t, expert)
        if kept.numel() == 0:
            return None
        x = t["moe_input"]
        if role == "w13":
            return x[kept]
        w13 = self.source.block(expert, expert + 1)[0][0]
        bounds = t["batch_rows"].tolist()
        hs, numbers = [], []
        for b0, b1 in zip(bounds[:-1], bounds[1:], strict=False):
            seen, _ = _expert_rows(t["topk_ids"][b0:b1], expert, self.all_experts)
            if seen.any():
                hs.append(x[b0:b1][seen] @ w13.T)
                numbers.append(torch.arange(b0, b1)[seen])
        h = torch.cat(hs)[torch.searchsorted(torch.cat(numbers), kept)]
        return ops.swiglu(h)
