"""Expert-parallel layer-by-layer calibration: which rank computes which routed experts, and how
their results meet.

Rank 0 (the lead) does every non-expert step: embeddings, each decoder layer's attention and
router, the hidden states and the work dir. It sends each MoE layer's recorded inputs and routing
to every rank. Each rank then computes the routed experts whose primary copy `Placement` gives it,
reading only their tensors: their outputs on the calibration tokens, their captures and their
alpha-search rows. The lead gathers the outputs and adds them in expert order, exactly the
additions of a single process, so the layer output (and everything after it) does not depend on
the number of processes or on the placement. The search rows go to the layer's searcher
(quantfw.parallel.search).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import torch

from quantfw.parallel.dist import Dist
from quantfw.parallel.placement import Placement

__all__ = ["ExpertShare", "LayerParts"]

_SEARCH_KEYS = ("rows", "report")  # a part's entries its layer's searcher receives
# Experts per search-rows message: a held int4 down-projection is 7.5 MB at DeepSeek-V3 dims and a
# message is pickled whole on both ends, so one message per layer would double the searcher's peak
# (spilled experts travel as their file's name).
_EXPERTS_PER_MESSAGE = 16

# Test hook, inert unless set: QUANTFW_DIST_KILL=RANK:LAYER SIGKILLs that rank as it starts that
# layer's experts (a rank dying mid-run); RANK:LAYER:stall makes it sleep there instead;
# RANK:LAYER:search kills it as it starts that layer's alpha search.
_KILL = os.environ.get("QUANTFW_DIST_KILL", "")


def kill_hook(rank: int, layer: int, where: str = "experts") -> None:
    if not _KILL:
        return
    parts = _KILL.split(":")
    if parts[:2] != [str(rank), str(layer)] or (where == "search") != (parts[2:] == ["search"]):
        return
    if parts[2:] == ["stall"]:
        time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class LayerParts:
    """One MoE layer's expert results, whole: outs [T_b, H] per call, alpha-search rows and
    report rows per expert, kept token numbers per expert and routed counts [E]."""

    outs: list[torch.Tensor]
    rows: list
    report: list
    kept: list[torch.Tensor]
    counts: torch.Tensor


class ExpertShare:
    """This process's share of every layer's routed experts (a lone process: all of them)."""

    def __init__(self, dist: Dist | None = None, declared=None):
        self.dist = dist or Dist()
        self.declared = declared  # the recipe's `placement` (null: contiguous blocks)
        self._placements: dict[int, Placement] = {}
        self._contrib: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def world(self) -> int:
        return self.dist.world

    @property
    def lead(self) -> bool:
        return self.dist.rank == 0

    def placement(self, num_experts: int) -> Placement:
        if num_experts not in self._placements:
            self._placements[num_experts] = Placement.from_config(self.declared, num_experts, self.world)
        return self._placements[num_experts]

    def owned(self, num_experts: int) -> tuple[int, ...]:
        """The experts this rank computes: those whose primary copy it holds."""
        return self.placement(num_experts).primaries(self.dist.rank)

    def blocks(self, num_experts: int, block: int) -> list[range]:
        """This rank's experts as contiguous ranges of at most `block` (one read each)."""
        out: list[range] = []
        for e in self.owned(num_experts):
            last = out[-1] if out else None
            if last is not None and last.stop == e and len(last) < block:
                out[-1] = range(last.start, e + 1)
            else:
                out.append(range(e, e + 1))
        return out

    def hooks(self, layer: int, num_experts: int, block: int) -> dict:
        """run_blocks' keyword arguments for this rank: its blocks and, when experts are split,
        the hook that keeps each expert's output rows apart for the ordered sum."""
        if self.world == 1 and self.declared is None:
            return {}
        kill_hook(self.dist.rank, layer)
        self._contrib = {}
        return {"blocks": self.blocks(num_experts, block), "add": self._add}

    def _add(self, e: int, b: int, rows: torch.Tensor, y: torch.Tensor) -> None:
        self._contrib[e, b] = (rows, y)

    def calls(self, calls: list | None) -> list:
        """The lead's recorded (hidden, topk_weights, topk_ids) of a layer, on every rank."""
        return self.dist.broadcast(calls, "the MoE inputs broadcast")

    def part(self, outs: list[torch.Tensor], cap, rows: list, report: list):
        """This rank's results of a layer: `outs` are run_blocks' sums, `cap` the LayerCapture,
        `rows`/`report` the alpha-search rows it filled. A lone process computing every expert
        already has the whole LayerParts; otherwise a picklable dict of its own experts (rows held
        in memory travel whole, spilled ones as their work-dir file: quantfw.calibrate.row_store)."""
        E = cap.num_experts
        if not self._contrib and self.world == 1 and self.declared is None:
            return LayerParts(outs, rows, report, [cap.kept_tokens(e) for e in range(E)], cap.counts)
        mine = self.owned(E)
        part = {
            "contrib": self._contrib,
            "rows": {e: rows[e] for e in mine},
            "report": {e: report[e] for e in mine},
            "kept": {e: cap.kept_tokens(e) for e in mine},
            "counts": {e: int(cap.counts[e]) for e in mine},
            "num_experts": E,
        }
        self._contrib = {}
        return part

    def gather(self, part, searcher: int = 0, search: bool = True) -> tuple[list | None, list | None]:
        """(every rank's part without its search rows on the lead, every rank's search rows and
        report on `searcher`; None where not received). Collectives: outside any step that may
        fail alone. `search` False (a scheme without a search) sends no rows."""
        if isinstance(part, LayerParts):
            return [part], [part] if search else None
        rows = {k: part.pop(k) for k in _SEARCH_KEYS}
        E = part.pop("num_experts")
        parts = self.dist.gather(part, "the expert results gather")
        if not search:
            return parts, None
        got = None
        for lo in range(0, E, _EXPERTS_PER_MESSAGE):
            ids = range(lo, lo + _EXPERTS_PER_MESSAGE)
            piece = {k: {e: v for e, v in rows[k].items() if e in ids} for k in rows}
            recv = self.dist.gather(piece, "the alpha-search rows gather", dst=searcher)
            if recv is not None:
                got = got or [{k: {} for k in rows} for _ in recv]
                for g, r in zip(got, recv, strict=True):
                    for k in r:
                        g[k].update(r[k])
        return parts, got

    @staticmethod
    def search_rows(parts: list) -> tuple[list, list]:
        """(alpha-search rows, report rows) of every expert in expert order from every rank's
        search share."""
        if isinstance(parts[0], LayerParts):
            return parts[0].rows, parts[0].report
        rows, report = {}, {}
        for p in parts:
            rows.update(p["rows"])
            report.update(p["report"])
        E = len(rows)
        return [rows[e] for e in range(E)], [report[e] for e in range(E)]

    def merge(self, parts: list, calls: list) -> LayerParts:
        """The layer's expert outputs, kept rows and counts from every rank's part, on the lead
        (its search rows went to the searcher: `rows` and `report` are left empty)."""
        if isinstance(parts[0], LayerParts):
            return parts[0]
        merged = {k: {} for k in parts[0]}
        for p in parts:
            for k in merged:
                merged[k].update(p[k])
        E = len(merged["counts"])
        sums = [torch.zeros_like(x) for x, _, _ in calls]
        for e in range(E):  # expert order: the additions a single process makes
            for b in range(len(calls)):
                got = merged["contrib"].get((e, b))
                if got is not None:
                    sums[b].index_add_(0, *got)
        return LayerParts(
            sums,
            [],
            [],
            [merged["kept"][e] for e in range(E)],
            torch.tensor([merged["counts"][e] for e in range(E)], dtype=torch.int64),
        )
