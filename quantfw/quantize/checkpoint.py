"""Float HF checkpoint -> quantized checkpoint in a scheme's on-disk format, shard by shard.

Each input shard becomes one output shard (peak memory ~ one shard plus its quantized copy).
`TensorRouter` decides what each input tensor becomes, `ExpertEncoder` quantizes and encodes it,
`ShardStore` holds the partial output, its per-shard records (resume) and the final rename.
Under torchrun (WORLD_SIZE > 1) rank r converts shards r, r+W, ...; rank 0 writes the index and
metadata.

Speed (docs/checkpoints.md, Throughput): torch runs single-threaded inside the converter and
`workers` Python threads quantize different tensors of a shard in parallel (torch releases the GIL);
intra-op threads on small row blocks collapse under CPU contention. Each output shard's header
is planned from the input's headers (shard_plan.py), so its bytes are written once, by a writer
thread that hashes them on the way (hashlib and file writes release the GIL); the record is
written after the shard, so a crash meanwhile just redoes it. finalize trusts the records of
shards written or verified in this run (any rank).

Nothing lost (`ShardStore`): the output may not overlap the input; rank 0 holds the output's lock;
a kill anywhere, finalize included, resumes to the same bytes; Ctrl-C and OS errors keep the
partial state, only bad input discards it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch

from quantfw.calibrate.result import CalibrationResult
from quantfw.errors import CheckpointError, ConfigError, OutputKeptError, QuantfwError
from quantfw.formats.format import Format
from quantfw.io import metadata
from quantfw.io.experts import MoEModel, parse_expert_key
from quantfw.io.reader import CheckpointReader
from quantfw.parallel.dist import Dist
from quantfw.progress import bar
from quantfw.quantize import store as output_store
from quantfw.quantize.alloc import keep_freed_memory
from quantfw.quantize.encode import ExpertEncoder, layer_of, linear_scheme_named
from quantfw.quantize.record import QuantReport
from quantfw.quantize.routing import Part, TensorRouter
from quantfw.quantize.shard_plan import plan_shard
from quantfw.quantize.store import ShardStore, os_error
from quantfw.schemes.scheme import Scheme

# Never copied to the output: weights (the output has its own) and pickles.
WEIGHT_FILES = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".gguf")


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def default_workers(dist_world: int = 1, busy_local: int | None = None) -> int:
    """One quantize thread per core this process may use: the cores are shared by the torchrun
    ranks of this node that are still converting (`busy_local`, default all of them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist_world))
    return max(1, cores // max(1, busy_local or local))


def busy_local_ranks(rank: int, world: int, shards: int, k: int) -> int:
    """Ranks of `rank`'s node that still convert while it converts its k-th shard (round robin:
    rank r has shards r, r+W, ...): once the others are done (waiting in a collective, which
    sleeps), their cores are free. torchrun numbers each node's ranks contiguously."""
    local = max(1, min(world, int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    node = rank // local * local
    return sum(1 for r in range(node, min(node + local, world)) if len(range(r, shards, world)) > k)


@dataclass
class ConvertOptions:
    """What a conversion does beyond scheme and format.

    workers: quantize threads per process (default: usable cores / local torchrun ranks).
    targets / ignore: regexes over non-expert module names to write W8A8 (recipe `quantize.*`).
    mtp: what becomes of the MTP layers, `quantize` or `drop` (recipe `quantize.mtp`, routing.py).
    calibration: what quantfw.calibrate found, whole: the clip alphas per MoE layer and how they
    were obtained, the data-driven weight observer's per-layer inputs and their data (its report
    lands in the metadata as weight_calibration), the equalization scales applied to up / down."""

    overwrite: bool = False
    proj_names: Mapping[str, str] | None = None
    progress: bool = True
    workers: int | None = None
    targets: Sequence[str] = ()
    ignore: Sequence[str] = ()
    mtp: str = "quantize"
    calibration: CalibrationResult | None = None
    compute_dtype: str = "float32"  # recipe quantize.compute_dtype (encode.compute_flags)
    # layer -> Scheme of the recipe's `layers` choices (config/layer_choice.py)
    layers: Mapping[int, Scheme] | None = None
    linear_scheme: str | None = None  # recipe quantize.linear_scheme (None: the schema default)


class Converter:
    def __init__(
        self, input: str | Path, output: str | Path, scheme: Scheme, fmt: Format, options: ConvertOptions
    ):
        o = options
        self.workers = o.workers
        calib = self.calibration = o.calibration or CalibrationResult({})
        # MoE layer -> inputs(role, expert) -> x [M, K] for a data-driven weight observer
        self.weight_inputs = {int(k): v for k, v in calib.inputs.items()}
        self.expert_scales = {int(k): v.float() for k, v in calib.scales.items()}
        self._report = QuantReport()
        # MoE layer -> W4A8-clip alpha [E]
        self.alphas = {int(k): v.float() for k, v in calib.alphas.items()}
        self.reader = CheckpointReader(input)
        self.config = self.reader.config()
        self.model = MoEModel.from_reader(
            self.reader, o.proj_names
        )  # config dims checked against the headers
        self.router = TensorRouter(self.reader, self.model, o.targets, o.ignore, o.mtp)
        self.config = self.router.output_config(self.config)
        self.targets, self.ignore = self.router.targets, self.router.ignore
        self.scheme, self.fmt, self.progress = scheme, fmt, o.progress
        self.out = Path(output).resolve()
        self.overwrite = o.overwrite
        fmt.check_compatible(scheme)
        dims = self.model.dims()
        scheme.check_dims(dims)
        for layer, a in self.alphas.items():
            if tuple(a.shape) != (dims.E,) or not bool(((a > 0) & (a <= 1)).all()):
                raise CheckpointError(
                    f"alphas of layer {layer}: shape {list(a.shape)}, expected [{dims.E}] values in (0, 1]"
                )
        self.compute_dtype = o.compute_dtype
        self.encoder = ExpertEncoder(
            scheme,
            fmt,
            self.model,
            dims,
            o.compute_dtype,
            linear_scheme_named(o.linear_scheme) if self.targets else None,
        )
        self.layer_encoders, self.layer_choices = self._layer_choices(dict(o.layers or {}), dims)
        self.observer_needs_data = self.encoder.needs_data
        n = len(self.reader.shards)
        base = fmt.shard_base
        self.names = [f"{base}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.index_name = f"{base}.safetensors.index.json"
        self.alpha_method = "none: alpha = 1 (no calibration)" if scheme.clips else None
        if self.alphas and scheme.clips:
            self.alpha_method = calib.alpha_method
        fingerprint = hashlib.sha256(
            json.dumps(
                [
                    metadata.VERSION,
                    scheme.signature(),
                    fmt.name,
                    fmt.tensors,
                    dict(self.model.proj_names),
                    self.targets,
                    self.ignore,
                    o.mtp,
                    {k: v.tolist() for k, v in sorted(self.alphas.items())},
                    # the weight calibration: token source + seed, per-expert row counts
                    # (observer parameters are scheme flags, in the signature)
                    (calib.data or None) if self.observer_needs_data else None,
                    *([o.compute_dtype] if o.compute_dtype != "float32" else []),
                    *([self.layer_choices] if self.layer_choices else []),
                    *(
                        [{k: v.tolist() for k, v in sorted(self.expert_scales.items())}]
                        if self.expert_scales
                        else []
                    ),
                ],
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()
        self.store = ShardStore(self.out, fingerprint, self.reader.folder)
        self.tmp = self.store.tmp
        if not self.store.journal.exists():  # early; checked again under the lock
            self.store.check_target(self.overwrite)

    def _layer_choices(self, layers: dict[int, Scheme], dims) -> tuple[dict[int, ExpertEncoder], dict]:
        """Encoders of the MoE layers a `layers` choice names, and the choices as metadata; the
        chosen layers without routed experts get their MLP linears written W8A8 (routing.py)."""
        if not layers:
            return {}, {}
        moe, every = self.router.layers()
        encoders, dense, choices = {}, [], {}
        for layer, s in sorted(layers.items()):
            if layer not in every:
                raise ConfigError(
                    f"layers: {self.reader.folder} has no layer {layer} (its layers: {min(every)}-{max(every)})"
                )
            if layer in moe:
                self.fmt.check_compatible(s)
                s.check_dims(dims)
                encoders[layer] = ExpertEncoder(s, self.fmt, self.model, dims, self.compute_dtype)
            elif s.flags["weight_bits"] != 8 or s.flags.get("group_size"):
                raise ConfigError(
                    f"layers: layer {layer} has no routed experts; its MLP linears are written W8A8 only "
                    f"(found scheme '{s.name}' with {s.flags['weight_bits']}-bit weights)"
                )
            else:
                dense.append(layer)
            applies = "routed experts" if layer in moe else "mlp linears"
            choices[str(layer)] = {
                "scheme": s.name,
                "applies": applies,
                "clips": s.clips,
                "flags": dict(sorted(s.flags.items())),
            }
        self.router.dense_layers = set(dense)
        return encoders, choices

    # ------------------------------------------------------------------ one projection / shard

    def _quantize_part(self, part: Part, out: dict, types: dict) -> None:
        if part.proj == "linear":
            o, t = self.encoder.linear(part.prefix, part.weight, part.src, part.fp8_scales)
        else:
            layer = layer_of(part.prefix)
            o, t, record = self.layer_encoders.get(layer, self.encoder).expert(
                part.prefix,
                part.expert,
                part.proj,
                self._equalized(part),
                self.weight_inputs.get(layer),
                self._alpha(part),
                part.src,
                part.fp8_scales,
            )
            if record is not None:
                self._report.records.append(record)  # list.append is atomic: worker threads share it
        out.update(o)
        types.update(t)

    def _equalized(self, part: Part) -> torch.Tensor:
        """The expert weight with its layer's equalization applied (quantfw.calibrate.equalize)."""
        scales = self.expert_scales.get(layer_of(part.prefix))
        if scales is None:
            return part.weight
        from quantfw.calibrate.equalize import equalize_weight

        return equalize_weight(part.proj, part.weight.float(), scales[part.expert])

    def _alpha(self, part: Part) -> torch.Tensor | None:
        """This expert's learned alpha (encoded only where the format declares it), None = the
        encoder's alpha = 1."""
        layer = layer_of(part.prefix)
        if layer not in self.alphas:
            return None
        return self.alphas[layer][part.expert]

    def convert_shard(self, shard: str, sink: Callable[[dict[str, torch.Tensor]], None]) -> dict[str, str]:
        """Quantize one input shard into `sink` (its output tensors, in key order, so the output
        does not depend on thread timing) and return their types. Up to `self.workers` tensors are
        in flight: memory holds those, not the shard."""
        workers = self.workers or 1

        def work(key, t, parts):
            out: dict[str, torch.Tensor] = {}
            types: dict[str, str] = {}
            if not parts:
                if t.dtype in _FINITE_CHECKED and not _all_finite(t):
                    raise CheckpointError(
                        f"{self.reader.folder / shard}: tensor '{key}' contains NaN or Inf "
                        "(quantize writes finite values only)"
                    )
                return {key: t}, {key: metadata.FLOAT}
            for part in parts:
                self._quantize_part(part, out, types)
            return out, types

        types: dict[str, str] = {}

        def collect(result):
            o, ty = result
            sink(o)
            types.update(ty)

        if workers <= 1:
            for job in self.router.jobs(shard):
                collect(work(*job))
            return types
        pending: deque = deque()
        with ThreadPoolExecutor(workers) as pool:
            try:
                for job in self.router.jobs(shard):
                    pending.append(pool.submit(work, *job))
                    if len(pending) > workers:
                        collect(pending.popleft().result())
                while pending:
                    collect(pending.popleft().result())
            finally:
                for f in pending:
                    f.cancel()
        return types

    # ------------------------------------------------------------------ resume records

    def _input_stamp(self, i: int) -> dict:
        st = (self.reader.folder / self.reader.shards[i]).stat()
        return {"input": self.reader.shards[i], "input_size": st.st_size, "input_mtime_ns": st.st_mtime_ns}

    def _finished(self, i: int, rehash: bool = True) -> dict | None:
        return self.store.finished(self.names[i], self._input_stamp(i), rehash)

    def _log(self, msg: str) -> None:
        if self.progress:
            self._note(msg)

    @staticmethod
    def _note(msg: str) -> None:
        """Printed even without progress: what happened to an earlier run's lock or output."""
        print(f"quantfw quantize: {msg}", file=sys.stderr, flush=True)

    def _do_shard(self, i: int) -> tuple[dict[str, str], QuantReport, str | None] | None:
        """Convert and write shard i; its tensor types and weight-observer records for the record
        (None: verified, skipped)."""
        n = len(self.names)
        if self._finished(i) is not None:
            self._log(f"[{i + 1}/{n}] {self.names[i]} already done (verified), skipped")
            return None
        t0 = time.perf_counter()
        self._report = report = QuantReport()
        shard = self.reader.shards[i]
        planned = plan_shard(self.router, self.layer_encoders, self.encoder, shard)
        writer = self.store.shard_writer(self.names[i], {"format": "pt"}, planned)
        try:
            types = self.convert_shard(shard, writer.add)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        gb = self._input_stamp(i)["input_size"] / 1e9
        self._log(
            f"[{i + 1}/{n}] {self.names[i]} {gb:.3f} GB in {time.perf_counter() - t0:.2f} s (record pending)"
        )
        fell = len(report.fallbacks)
        if report.records:
            self._log(
                f"[{i + 1}/{n}] weight observer: {len(report.records) - fell} data-driven, {fell} fallback"
            )
        return types, report, writer.digest

    def _write_record(
        self, i: int, types: dict[str, str], report: QuantReport, digest: str | None = None
    ) -> None:
        self.store.write_record(
            self.names[i],
            self._input_stamp(i),
            {"tensors": types, "weight_calibration": report.to_json()},
            digest,
        )

    def _finalize(self, done: list[bool]) -> None:
        weight_map: dict[str, str] = {}
        types: dict[str, str] = {}
        total = 0
        records: list[dict] = []  # every shard's, in shard order
        for i, name in enumerate(self.names):
            rec = self._finished(i, rehash=not done[i])
            if rec is None:
                raise CheckpointError(f"{self.tmp / name}: shard missing or failed verification at finalize")
            for k, t in rec["tensors"].items():
                weight_map[k] = name
                types[k] = t
            total += rec["size"]
            records += rec.get("weight_calibration", [])
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        # Everything lands in the partial folder first and is rewritten whole on a rerun; the
        # journaled commit then replaces the target.
        self._copy_extra_files()  # before the metadata, whose config.json replaces the input's
        metadata.dump(self.tmp / self.index_name, index)
        output_store.step()
        prov = metadata.provenance(self.scheme, self.fmt.name, self.alpha_method)
        calib = self.calibration
        if calib.alpha_metadata is not None:
            prov["alpha_calibration"] = calib.alpha_metadata
        if self.compute_dtype != "float32":
            prov["compute_dtype"] = self.compute_dtype
        if calib.equalization is not None:
            prov["equalization"] = calib.equalization
        if self.observer_needs_data:
            report = QuantReport.from_json(records)
            prov["weight_calibration"] = report.weight_calibration(self.scheme.flags, calib.data or None)
        if self.layer_choices:
            prov["layers"] = self.layer_choices
        if self.targets or self.router.dense_layers:
            modules = sorted(
                k[: -len(".weight")]
                for k, t in types.items()
                if t == self.encoder.linear_type
                and k.endswith(".weight")
                and not parse_expert_key(k, self.model)
            )
            every = sorted({k[: -len(".weight")] for k in weight_map if k.endswith(".weight")})
            unmatched = {
                "targets": [p for p in self.targets if not any(re.search(p, m) for m in modules)],
                "ignore": [p for p in self.ignore if not any(re.search(p, m) for m in every)],
            }
            prov["linears"] = {
                "targets": self.targets,
                "ignore": self.ignore,
                self.encoder.linear_scheme.name: modules,
                "unmatched": unmatched,
            }
            self._log(
                f"{len(modules)} non-expert linear(s) {self.encoder.linear_scheme.name}; patterns matching nothing: {unmatched}"
            )
        linear = (
            self.encoder.linear_scheme
            if prov.get("linears", {}).get(self.encoder.linear_scheme.name)
            else None
        )
        metadata.write(self.fmt, self.tmp, self.config, self.scheme, types, prov, linear)
        output_store.step()
        self.store.commit(self.names)

    def _copy_extra_files(self) -> None:
        """The input's other files (tokenizer, generation config, ...) into the partial folder;
        not its weights in any format (pickled `.bin`/`.pt` files are float weights, not ours)."""
        for p in self.reader.extra_files():  # regular files inside the input, links resolved
            if not p.name.endswith(WEIGHT_FILES) and not self.store.is_bookkeeping(p.name):
                self.store.copy_in(p)

    def run(self, dist: Dist | None = None) -> Path:
        """Convert under the output's lock (rank 0 holds it); see the module doc for what an
        error, an interrupt or a kill leaves behind."""
        dist = dist or Dist()
        try:
            return self._run_locked(dist)
        finally:
            if dist.rank == 0:
                self.store.lock.release()

    @contextmanager
    def _os_errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise os_error(e, self.tmp) from None

    def _run_locked(self, dist: Dist) -> Path:
        error: QuantfwError | None = None
        complete = False
        try:
            if dist.rank == 0:
                with self._os_errors():
                    self.store.lock.acquire(self._note)
                    complete = self.store.prepare(self.overwrite, self._note)
        except QuantfwError as e:
            error = e
        if dist.any_failed(error is not None):
            raise error or CheckpointError("quantize failed on rank 0 (see its error)")
        if dist.union([complete])[0]:
            return self.out
        dist.barrier()
        done = [False] * len(self.names)
        fixed = self.workers
        keep_freed_memory()
        try:
            with self._os_errors(), _torch_threads(1), ThreadPoolExecutor(1) as hasher:
                records = []
                mine = range(dist.rank, len(self.names), dist.world)
                size = sum(self._input_stamp(i)["input_size"] for i in mine)
                with bar(total=size, unit="B", unit_scale=True, desc="quantize", progress=self.progress) as b:
                    for k, i in enumerate(mine):
                        busy = busy_local_ranks(dist.rank, dist.world, len(self.names), k)
                        self.workers = fixed or default_workers(dist.world, busy)
                        result = self._do_shard(i)
                        if result is not None:
                            records.append(hasher.submit(self._write_record, i, *result))
                        done[i] = True
                        b.set_postfix_str(f"{k + 1}/{len(mine)} shards", refresh=False)
                        b.update(self._input_stamp(i)["input_size"])
                for r in records:
                    r.result()
        except QuantfwError as e:
            error = e
        failed, kept = dist.union([error is not None, isinstance(error, OutputKeptError)])
        if failed:
            dist.barrier()
            if dist.rank == 0 and not kept:
                # Bad input: nothing worth resuming; leave no partial output behind.
                with suppress(OSError):
                    self.store.discard()
            raise error or CheckpointError("quantize failed on another rank (see its error)")
        done = dist.union(done)
        # Rank 0 alone finalizes; every rank learns the outcome, so a failure there ends them all.
        dist.run("finalize", lambda: self._finalize_logged(done), only_rank0=True)
        return self.out

    def _finalize_logged(self, done: list[bool]) -> None:
        with self._os_errors():
            self._finalize(done)
        self._log(f"wrote {self.out}")


_FINITE_CHECKED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _all_finite(t: torch.Tensor) -> bool:
    """Whether t holds no NaN or Inf, from its min and max (both propagate NaN): one pass without
    the GB-sized bool tensor of torch.isfinite on an embedding."""
    if not t.numel():
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def quantize_checkpoint(
    input: str | Path, output: str | Path, scheme: Scheme, fmt: Format, dist: Dist | None = None, **options
) -> Path:
    """Quantize every routed expert of a float checkpoint folder into `output` (see module doc);
    `options` are the fields of ConvertOptions."""
    return Converter(input, output, scheme, fmt, ConvertOptions(**options)).run(dist)
