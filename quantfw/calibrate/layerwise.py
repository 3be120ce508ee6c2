"""Layer-by-layer calibration: never more than one decoder layer in memory.

The calibration tokens are embedded (only the embedding rows they use are read); then each decoder
layer is built alone (`quantfw.calibrate.decoder`), run on the hidden states with its routed
experts streamed a block at a time (`quantfw.calibrate.streaming`), its alphas learned right there
from its captures, and freed; its float outputs are the next layer's inputs. Per layer the work dir
(`quantfw.calibrate.workdir`) receives what the data-driven observers need (the MoE inputs [T, H],
routing and kept rows, read back lazily by `SpilledInputs`), the layer's results and its output
hidden states, all checksummed, so a killed run resumes at the first unfinished layer. Hidden
states over `memory_budget_mb` are kept on disk only, read a batch at a time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from quantfw.calibrate.decoder import DecoderStack, check_model_type
from quantfw.calibrate.equalize import declared, equalize_block
from quantfw.calibrate.experts import LayerCapture, expert_alpha_rows
from quantfw.calibrate.propagate import check_propagate, quantized_outputs
from quantfw.calibrate.row_store import FOLDER, RowStore
from quantfw.calibrate.stages import STAGES, Stages
from quantfw.calibrate.streaming import ExpertSource, SpilledInputs, StreamingExperts, run_blocks
from quantfw.calibrate.workdir import WorkDir
from quantfw.errors import ConfigError
from quantfw.io.experts import MoEModel, expert_prefixes
from quantfw.io.reader import CheckpointReader
from quantfw.parallel.calibration import ExpertShare, LayerParts
from quantfw.parallel.search import AlphaSearches
from quantfw.schemes.scheme import Scheme

__all__ = ["AFTER_LAYER", "LayerResult", "calibrate_layers"]

# Called with the layer index once a layer's results are saved (tests stop a run here). Inert.
AFTER_LAYER: Callable[[int], None] | None = None
# Keys that change how calibration runs, not what it finds: left out of the resume fingerprint.
_RUN_ONLY = ("progress", "memory_budget_mb", "search_memory_mb", "expert_block", "work_dir", "layerwise")


class LayerResult:
    """One MoE layer's outcome: alphas (None: the scheme does not clip), report rows, routed
    counts and kept rows per expert, the spill file the observers read, and the equalization
    scales [E, I] (None: calibration.equalize is empty)."""

    def __init__(self, alphas, report, counts, kept, spill: Path, scales=None):
        self.alphas, self.report, self.counts, self.kept, self.spill = alphas, report, counts, kept, spill
        self.scales = scales


class _Hidden:
    """Hidden states [B, S, H] per batch: in memory, or (over the budget) only in their files."""

    def __init__(self, tensors: list[torch.Tensor | None], files: list[Path], in_memory: bool):
        self.tensors, self.files, self.in_memory = tensors, files, in_memory

    def __getitem__(self, b: int) -> torch.Tensor:
        if self.in_memory:
            return self.tensors[b]
        return WorkDir.load(self.files[b])[0]["hidden"]


class _Progress:
    """One line per layer on stderr (tqdm when installed)."""

    def __init__(self, total: int, start: int, on: bool):
        self.total, self.on, self.t0, self.start, self.bar = total, on, time.perf_counter(), start, None
        self.experts = 0
        if on and sys.stderr.isatty():  # a live bar only where it can redraw; logs get the lines
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, file=sys.stderr, unit="layer", desc="calibration")
            except ImportError:
                pass
            if start:
                self._line(
                    f"resumed at layer {start + 1}/{total} ({start} layer(s) verified in the work dir)"
                )

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"quantfw calibrate: {text}", file=sys.stderr)
        else:
            print(f"quantfw calibrate: {text}", file=sys.stderr, flush=True)

    def layer(self, i: int, experts: int, seconds: float, stages: dict[str, float] | None = None) -> None:
        if not self.on:
            return
        self.experts += experts
        done = i + 1 - self.start
        spent = time.perf_counter() - self.t0
        eta = spent / done * (self.total - i - 1)
        rate = f"{self.experts / spent:.1f} experts/s" if self.experts else "dense"
        text = f"layer {i + 1}/{self.total}: {experts} experts in {seconds:.1f} s, {rate}, ETA {eta:.0f} s"
        if stages:
            text += f" ({Stages.line(stages)})"
        if self.bar is not None:
            self.bar.set_postfix_str(f"{experts} experts, {rate}, ETA {eta:.0f} s", refresh=False)
            self.bar.update(1)
        self._line(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fingerprint(reader: CheckpointReader, scheme: Scheme, calib, windows: torch.Tensor) -> str:
    stamps = [
        (s, (reader.folder / s).stat().st_size, (reader.folder / s).stat().st_mtime_ns) for s in reader.shards
    ]
    settings = OmegaConf.to_container(calib, resolve=True) if OmegaConf.is_config(calib) else dict(calib)
    settings = {k: v for k, v in settings.items() if k not in _RUN_ONLY}
    blob = json.dumps(
        [reader.config(), stamps, scheme.signature(), settings, windows.tolist()], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _work_dir(work_dir: str | Path | None):
    """(path, owner): a temporary dir removed with the returned owner when none is given."""
    if work_dir is not None:
        return Path(work_dir), None
    path = Path(tempfile.mkdtemp(prefix="quantfw-calibration-"))

    class _Owner:
        pass

    owner = _Owner()
    weakref.finalize(owner, shutil.rmtree, path, True)
    return path, owner


def calibrate_layers(
    folder: str | Path,
    scheme: Scheme,
    calib,
    windows: torch.Tensor,
    work_dir: str | Path | None = None,
    progress: bool = True,
    fmt=None,
    backend=None,
    mtp: bool = False,
    share: ExpertShare | None = None,
):
    """Run the calibration `windows` [n, seq_len] through the model of `folder` one decoder layer at
    a time (module doc). Returns ({moe layer: LayerResult}, {moe layer: SpilledInputs}, owner of a
    temporary work dir or None). `fmt` and `backend` run the quantized experts that
    calibration.propagate=quantized passes on (quantfw.calibrate.propagate); `mtp` calibrates the
    MTP layer after the main ones (the recipe's quantize.mtp=quantize). Under torch.distributed
    `share` splits each layer's routed experts over the ranks (quantfw.parallel.calibration);
    every rank returns the same results."""
    share = share or ExpertShare()
    if share.world > 1 and declared(calib):
        raise ConfigError("calibration.equalize runs in one process (not under torchrun yet)")
    reader = CheckpointReader(folder)
    config = reader.config()
    check_model_type(config, str(reader.folder / "config.json"))
    propagate = str(calib.get("propagate", "float"))
    check_propagate(propagate, fmt, backend)
    clips = scheme.clips
    all_experts = bool(calib.get("all_experts", False))
    block = int(calib.get("expert_block", 4) or 4)
    budget = float(calib.get("memory_budget_mb", 2048)) * 2**20
    if block < 1:
        raise ConfigError(f"calibration.expert_block={block} (must be >= 1)")
    lead, dist = share.lead, share.dist
    path, owner = _work_dir(work_dir) if lead else (None, None)
    path = Path(dist.broadcast(str(path), "the work dir path"))
    fingerprint = dist.broadcast(_fingerprint(reader, scheme, calib, windows) if lead else None)
    model = MoEModel.from_config(config, str(reader.folder / "config.json"))
    prefixes = expert_prefixes(reader.keys(), model)
    stack = DecoderStack(folder, reader, StreamingExperts, mtp=mtp)
    info = {e.layer_index: e.info for e in stack.swap.entries}
    n = len(stack)
    searches = AlphaSearches(share, info, clips, spread=propagate != "quantized")

    batches = list(windows.split(int(calib.batch_size)))
    work = hidden = layer_args = None
    done = 0
    if lead:  # the lead alone holds the hidden states and writes the work dir
        work = WorkDir(path, fingerprint)
        embeds = [stack.embed(w) for w in batches]
        layer_args = [stack.layer_inputs(x) for x in embeds]
        in_memory = sum(x.numel() * 4 for x in embeds) <= budget
        done = work.resume_point()
        if done:
            files = [work.path / r["file"] for r in work.state["layers"][str(done - 1)]["hidden"]]
            hidden = _Hidden([], files, in_memory=False)
            hidden = _Hidden([hidden[b] for b in range(len(files))] if in_memory else [], files, in_memory)
        elif in_memory:
            hidden = _Hidden(embeds, [], in_memory)
        else:
            saved = [work.save(f"embeds-{b:04d}.safetensors", {"hidden": x}) for b, x in enumerate(embeds)]
            hidden = _Hidden([], [work.path / r["file"] for r in saved], in_memory)
        del embeds
    done = dist.broadcast(done, "the resume point")
    bar = _Progress(n, done, progress and lead)
    try:
        for i in range(done, n):
            t0 = time.perf_counter()
            STAGES.reset()
            if lead and i in stack.mtp_layers:
                hidden = _mtp_inputs(stack, i, batches, hidden, layer_args)
            moe = stack.moe_block(i)

            def materialize(i=i):
                with STAGES("layer read+dequant"):
                    return stack.materialize(i)

            layer = dist.run(f"layer {i} (decoder forward)", materialize, only_rank0=True)

            def run(b, layer=layer, i=i, hidden=hidden):
                args, kwargs = layer_args[b][i]
                with torch.no_grad(), STAGES("layer forward"):
                    return _output(layer(hidden[b], *args, **kwargs))

            spill_rec = None
            if moe is not None:
                experts = moe.experts
                experts.reset()

                def record(experts=experts, run=run):
                    for b in range(len(batches)):
                        run(b)  # records the MoE inputs and routing; the outputs come in the second pass

                dist.run(f"layer {i} (decoder forward)", record, only_rank0=True)
                experts.calls = share.calls(experts.calls if lead else None)
                source = ExpertSource(reader, model, i, prefixes.get(i))
                scales: list = []
                part = dist.run(
                    f"layer {i} (routed experts)",
                    lambda i=i, experts=experts, source=source, scales=scales: _calibrate_moe(
                        i,
                        experts,
                        info[i].num_experts,
                        source,
                        scheme,
                        calib,
                        clips,
                        all_experts,
                        block,
                        share,
                        path / FOLDER,
                        scales,
                    ),
                )
                parts = searches.collect(i, part)

                def finish_moe(i=i, experts=experts, source=source, parts=parts, scales=scales):
                    spill = _finish_moe(experts, share.merge(parts, experts.calls), scales)
                    with STAGES("write"):
                        rec = searches.save_spill(work, i, spill)  # None: its alphas come later
                    if propagate == "quantized":
                        spilled = SpilledInputs(work.path / rec["file"], source, all_experts)
                        experts.replay(
                            quantized_outputs(
                                experts.calls,
                                source,
                                info[i].num_experts,
                                block,
                                scheme,
                                fmt,
                                backend,
                                spill.get("alphas"),
                                spilled,
                            )
                        )
                    return rec

                spill_rec = dist.run(f"layer {i} (MoE output)", finish_moe, only_rank0=True)
                # this layer's captured rows and packed down-projections (~0.8 GB at DeepSeek dims)
                # would otherwise live on through the next layer's calibration (a pending search
                # keeps its own reference)
                del part, parts, finish_moe

            def finish(i=i, moe=moe, run=run, spill_rec=spill_rec, hidden=hidden):
                outputs = [run(b) for b in range(len(batches))]
                if moe is not None:
                    moe.experts.reset()
                stack.free(i)
                with STAGES("write"):
                    recs = [
                        work.save(f"hidden-{i:04d}-{b:04d}.safetensors", {"hidden": h})
                        for b, h in enumerate(outputs)
                    ]
                searches.finish_layer(work, i, spill_rec, recs)
                return _Hidden(
                    outputs if hidden.in_memory else [],
                    [work.path / r["file"] for r in recs],
                    hidden.in_memory,
                )

            hidden = dist.run(f"layer {i} (layer output)", finish, only_rank0=True)
            if moe is not None and not lead:
                moe.experts.reset()
            bar.layer(
                i, info[i].num_experts if moe is not None else 0, time.perf_counter() - t0, STAGES.reset()
            )
            if AFTER_LAYER is not None:
                AFTER_LAYER(i)
        searches.close(work)
    finally:
        bar.close()
    if not lead:  # the lead's records, read once it has written them all (shared storage)
        work = WorkDir(path, fingerprint)
    results: dict[int, LayerResult] = {}
    inputs = {}
    for i in range(n):
        rec = work.state["layers"][str(i)]["spill"]
        if rec is None:
            continue
        file = work.path / rec["file"]
        t, meta = WorkDir.load(file, ("kept_offsets", "counts", "alphas", "equalize_scales"))
        off = t["kept_offsets"]
        kept = (off[1:] - off[:-1]).tolist()
        alphas = t["alphas"] if "alphas" in t else None
        results[i] = LayerResult(
            alphas, json.loads(meta["report"]), t["counts"].tolist(), kept, file, t.get("equalize_scales")
        )
        inputs[i] = SpilledInputs(file, ExpertSource(reader, model, i, prefixes.get(i)), all_experts)
    return results, inputs, owner


def _mtp_inputs(stack: DecoderStack, i: int, batches, hidden: _Hidden, layer_args):
    """The MTP layer's hidden states (its layer arguments are set in `layer_args`): it predicts one
    token further than the main model, so it runs on the first S-1 positions of each window
    (DecoderStack.mtp_input)."""
    for b, w in enumerate(batches):
        layer_args[b][i] = stack.layer_inputs(stack.embed(w[:, 1:]))[i]
    return _Hidden([stack.mtp_input(i, w, hidden[b]) for b, w in enumerate(batches)], [], True)


def _calibrate_moe(
    i, experts, E, source, scheme, calib, clips, all_experts, block, share, spill_dir, scales_out=None
):
    """This rank's routed experts of layer i's recorded calls: its `ExpertShare.part` (outputs,
    captures, alpha-search rows, those over this rank's share of search_memory_mb spilled to
    `spill_dir`); `scales_out` receives the equalization scales per expert."""
    held = int(float(calib.get("search_memory_mb", 512)) * 2**20) // share.world
    cap = LayerCapture(i, E, calib.max_rows, store=RowStore(i, held, spill_dir))
    rows, report, scales = [None] * E, [None] * E, [None] * E

    def on_block(ids: range, w13, w2):
        # Equalization first (quantfw.calibrate.equalize), so the alpha search sees its experts.
        w13, w2, s = equalize_block(calib, scheme.flags, w13, w2, cap, ids)
        if s is not None:
            scales[ids.start : ids.stop] = list(s)
        if clips:
            with STAGES("alpha rows"):
                r, p = expert_alpha_rows(scheme, w13, w2, cap, ids, calib.min_tokens, calib.policy)
            rows[ids.start : ids.stop], report[ids.start : ids.stop] = r, p
        for e in ids:
            cap.drop_rows(e)

    hooks = share.hooks(i, E, block)
    outs = run_blocks(experts.calls, source, E, block, cap, all_experts, on_block, **hooks)
    if scales_out is not None:
        scales_out[:] = scales
    return share.part(outs, cap, rows, report)


def _finish_moe(experts, whole: LayerParts, scales=None) -> dict[str, torch.Tensor]:
    """The whole layer's outputs left in `experts` for the replay pass; its spill tensors for the
    work dir (the alpha search adds its alphas: quantfw.parallel.search)."""
    experts.replay(whole.outs)
    tensors = {
        "moe_input": torch.cat([x for x, _, _ in experts.calls]),
        "topk_ids": torch.cat([ids for _, _, ids in experts.calls]),
        "batch_rows": torch.tensor([0] + [x.shape[0] for x, _, _ in experts.calls]).cumsum(0),
        "kept_tokens": torch.cat(whole.kept),
        "kept_offsets": torch.tensor([0] + [k.shape[0] for k in whole.kept]).cumsum(0),
        "counts": whole.counts.clone(),
    }
    if scales and scales[0] is not None:
        tensors["equalize_scales"] = torch.stack(scales)
    return tensors
