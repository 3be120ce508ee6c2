"""Where and when each MoE layer's alpha search runs, and how its results reach the work dir.

A layer's search is a coordinate descent over all of its experts on the shared layer error, so it
runs in one place; but with the default float propagation the next layer's inputs do not depend on
the alphas, so the searches of different layers can run on different ranks at the same time. MoE
layer k (in stack order) is searched by rank k mod W: its rows go to that rank, which keeps them
and goes on with the next layers. When the lead's turn comes (every W MoE layers, and after the
last layer) every rank runs its pending search at once and the results reach the lead, which
writes each layer's records in layer order. A layer enters the work dir's state only once its
alphas are in, so a run that dies resumes at the first layer whose search was lost (at most W
layers back) and ends with the same bytes.

With propagate=quantized the next layer's inputs need the alphas: every search then runs on the
lead at once, as in a single process.
"""

from __future__ import annotations

import json

import torch

from quantfw.calibrate.experts import search_expert_rows
from quantfw.calibrate.row_store import discard
from quantfw.calibrate.stages import STAGES
from quantfw.parallel.calibration import ExpertShare, kill_hook

__all__ = ["AlphaSearches"]


class AlphaSearches:
    """The alpha searches of one calibration run (`clips` False: the scheme has none)."""

    def __init__(self, share: ExpertShare, moe_layers, clips: bool, spread: bool = True):
        self.share, self.dist, self.clips = share, share.dist, clips
        self.spread = spread and self.dist.world > 1
        self._ordinal = {i: k for k, i in enumerate(sorted(moe_layers))}
        self._batch: list[int] = []  # layers collected since the last flush (every rank)
        self._mine: list[tuple[int, list, list]] = []  # (layer, rows, report) this rank searches
        self._found: dict[int, tuple[torch.Tensor, list]] = {}  # lead: alphas and report per layer
        self._spills: dict[int, dict] = {}  # lead: spill tensors waiting for their alphas
        self._queue: list[tuple[int, dict | None, list]] = []  # lead: layers to record, in order

    def searcher(self, layer: int) -> int:
        return self._ordinal[layer] % self.dist.world if self.spread else 0

    def collect(self, layer: int, part) -> list | None:
        """After layer's routed experts (every rank): the search rows reach the layer's searcher,
        which keeps them; returns the other results on the lead (None elsewhere); runs the batch of
        searches when the layer is the lead's."""
        parts, rows = self.share.gather(part, self.searcher(layer), self.clips)
        if self.clips:
            self._batch.append(layer)
            if rows is not None:
                self._mine.append((layer, *self.share.search_rows(rows)))
            if self.searcher(layer) == 0:
                self.flush()
        return parts

    def flush(self) -> None:
        """Every rank runs its pending searches; their results reach the lead (collective)."""
        if not self._batch:
            return
        layers = ", ".join(str(i) for i in self._batch)
        what = (
            f"layer {layers} (alpha search)" if len(self._batch) == 1 else f"layers {layers} (alpha search)"
        )

        def search():
            found = {}
            for layer, rows, report in self._mine:
                kill_hook(self.dist.rank, layer, "search")
                with STAGES("alpha search"):
                    found[layer] = search_expert_rows(rows, report)
                discard(rows)
            return found

        found = self.dist.run(what, search)
        self._batch, self._mine = [], []
        got = self.dist.gather(found, "the alpha-search results gather")
        for f in got or []:
            self._found.update(f)

    def save_spill(self, work, layer: int, tensors: dict) -> dict | None:
        """The lead's spill of a MoE layer: written with its alphas and report (its record), or
        kept until they arrive (None)."""
        if not self.clips:
            return work.save(f"layer-{layer:04d}.safetensors", tensors, {"report": json.dumps([])})
        if layer not in self._found:
            self._spills[layer] = tensors
            return None
        alphas, report = self._found.pop(layer)
        tensors["alphas"] = alphas
        return work.save(f"layer-{layer:04d}.safetensors", tensors, {"report": json.dumps(report)})

    def finish_layer(self, work, layer: int, spill: dict | None, hidden: list) -> None:
        """The lead: layer's records ({"spill": spill, "hidden": hidden}) enter the work dir state
        in layer order, each once its alphas are in (WorkDir.finish_layer; each drops the previous
        layer's hidden states)."""
        self._queue.append((layer, spill, hidden))
        self._drain(work)

    def close(self, work) -> None:
        """After the last layer (every rank): the remaining searches, then the lead records the
        layers that waited for them; every rank returns once the work dir state is complete."""
        self.flush()

        def record():
            self._drain(work)
            if self._queue or self._spills:
                raise RuntimeError(f"layers {[i for i, _, _ in self._queue]} left without their alphas")

        self.dist.run("the last layers' records", record, only_rank0=True)

    def _drain(self, work) -> None:
        while self._queue:
            i, rec, recs = self._queue[0]
            if rec is None and i in self._spills:
                if i not in self._found:
                    return
                rec = self.save_spill(work, i, self._spills.pop(i))
            self._queue.pop(0)
            previous = work.state["layers"].get(str(i - 1), {}).get("hidden", [])
            work.finish_layer(i, {"spill": rec, "hidden": recs}, drop=[r["file"] for r in previous])
