"""Float HF checkpoint -> quantized checkpoint in a scheme's on-disk format, shard by shard.

Each input shard becomes one output shard (peak memory ~ one shard plus its quantized copy).
Routed-expert weights are quantized per expert and projection with `quantize_weight` and the
format's registered encoders; every other tensor passes through unchanged (non-expert linears
stay float). Output goes to a hidden `.NAME.partial` folder next to the target; each finished
shard gets a sidecar record (input size/mtime, output size and sha256, config fingerprint) so an
interrupted run resumes; the folder is renamed to the target only when complete. Under torchrun
(WORLD_SIZE > 1) rank r converts shards r, r+W, ...; rank 0 writes the index and metadata.

Speed (docs/checkpoints.md, Throughput): torch runs single-threaded inside the converter and
`workers` Python threads quantize different tensors of a shard in parallel (torch releases the GIL);
intra-op threads on small row blocks collapse under CPU contention. The sha256 of each written
shard is computed once, in a background thread while the next shard is quantized (hashlib
releases the GIL); its record is written only after that, so a crash meanwhile just redoes the
shard. finalize trusts the records of shards written or verified in this run (any rank).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantfw.errors import CheckpointError, ConfigError, QuantfwError
from quantfw.formats.encoders import encode_role
from quantfw.formats.format import Format
from quantfw.io import metadata
from quantfw.io.experts import FUSED_RE, MoEModel, key_of, parse_expert_key, projection_specs
from quantfw.io.reader import CheckpointReader
from quantfw.layout.spec import Dims, ParamSpec, instantiate
from quantfw.quantize import observers
from quantfw.quantize.experts import CalibrationInputs
from quantfw.quantize.weights import quantize_weight
from quantfw.schemes.scheme import Scheme

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHARD_BASE = {"msmodelslim": "quant_model_weight_w8a8_dynamic", "compressed_tensors": "model"}
MARKER = "quantfw-partial.json"


@dataclass
class Dist:
    """This process's share of the shards (torch.distributed gloo under torchrun, else 1 process)."""

    rank: int = 0
    world: int = 1
    owned: bool = False  # this object created the process group, so it tears it down

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("gloo")
        return cls(dist.get_rank(), dist.get_world_size(), owned)

    def close(self) -> None:
        """Destroy a group we created: gloo's threads left to interpreter exit can abort the
        process ("terminate called without an active exception") after the work is done."""
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def union(self, flags: list[bool]) -> list[bool]:
        """Element-wise OR of a per-shard flag list over all ranks."""
        if self.world == 1:
            return flags
        import torch.distributed as dist

        t = torch.tensor([int(f) for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def any_failed(self, failed: bool) -> bool:
        if self.world == 1:
            return failed
        import torch.distributed as dist

        flag = torch.tensor([int(failed)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def default_workers(dist_world: int = 1) -> int:
    """One quantize thread per core this process may use (cores shared by torchrun ranks)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist_world))
    return max(1, cores // max(1, local))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _layer_of(prefix: str) -> int:
    return int(prefix.split("layers.")[-1].split(".")[0])


def weight_calibration_metadata(flags: Mapping, records: list[dict], data: dict | None) -> dict:
    """The checkpoint-metadata entry of a data-driven weight observer, kept small: the observer
    and its parameters, the calibration data and coverage, per-layer lists of the experts that
    fell back, and each expert's mean learned clip ratio (not every channel)."""
    fallback: dict[str, dict[str, list[int]]] = {}
    reasons: dict[str, int] = {}
    clip: dict[str, dict[str, list]] = {}
    for r in records:
        layer = str(r["layer"])
        if r["fallback"]:
            fallback.setdefault(layer, {}).setdefault(r["proj"], []).append(r["expert"])
            kind = "no calibration inputs" if r["tokens"] == 0 else "too few calibration tokens"
            reasons[kind] = reasons.get(kind, 0) + 1
        if r["clip_ratio_mean"] is not None:
            clip.setdefault(layer, {}).setdefault(r["proj"], []).append([r["expert"], r["clip_ratio_mean"]])
    meta: dict = {
        **observers.data_params(flags),
        "data": data or {"source": "none: no calibration inputs"},
        "projections": len(records),
        "data_driven": sum(1 for r in records if not r["fallback"]),
        "tokens_used": sum(r["tokens"] for r in records if not r["fallback"]),
        "fallback": {"observer": observers.param(flags, "fallback_observer"), "count": sum(reasons.values())},
    }
    meta["fallback"].update(reasons=reasons, experts=fallback)
    if clip:
        meta["clip_ratio_mean"] = clip  # layer -> proj -> [[expert, mean ratio over channels], ...]
    return meta


class Converter:
    def __init__(
        self,
        input: str | Path,
        output: str | Path,
        scheme: Scheme,
        fmt: Format,
        overwrite: bool = False,
        proj_names: Mapping[str, str] | None = None,
        progress: bool = True,
        workers: int | None = None,
        targets: Sequence[str] = (),
        ignore: Sequence[str] = (),
        alphas: Mapping[int, torch.Tensor] | None = None,
        calibration: dict | None = None,
        weight_inputs: Mapping[int, CalibrationInputs] | None = None,
        weight_data: dict | None = None,
    ):
        self.workers = workers
        # weight_inputs: MoE layer -> inputs(role, expert) -> x [M, K] for a data-driven weight
        # observer (quantfw.calibrate); weight_data: where they came from (tokens, seed, coverage).
        self.weight_inputs = {int(k): v for k, v in (weight_inputs or {}).items()}
        self.weight_data = weight_data
        self.observer_needs_data = observers.needs_data(scheme.flags)
        self._wc_records: list[dict] = []
        # alphas: MoE layer -> W4A8-clip alpha [E] (from quantfw.calibrate); calibration: how.
        self.alphas = {int(k): v.float() for k, v in (alphas or {}).items()}
        self.calibration = calibration
        self.targets, self.ignore = list(targets), list(ignore)
        for pat in (*self.targets, *self.ignore):
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"quantize.targets/ignore: invalid regex {pat!r} ({e})") from None
        self.reader = CheckpointReader(input)
        self.config = self.reader.config()
        self.model = MoEModel.from_config(self.config, str(self.reader.folder / "config.json"), proj_names)
        self.scheme, self.fmt, self.progress = scheme, fmt, progress
        self.out = Path(output).resolve()
        if self.out == self.reader.folder.resolve():
            raise CheckpointError(f"output {self.out} is the input folder; choose another output")
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())) and not overwrite:
            raise CheckpointError(
                f"output {self.out} exists and is not empty (pass overwrite=true to replace it)"
            )
        fmt.check_compatible(scheme)
        dims = self.model.dims()
        scheme.check_dims(dims)
        for layer, a in self.alphas.items():
            if tuple(a.shape) != (dims.E,) or not bool(((a > 0) & (a <= 1)).all()):
                raise CheckpointError(
                    f"alphas of layer {layer}: shape {list(a.shape)}, expected [{dims.E}] values in (0, 1]"
                )
        self.specs = projection_specs(fmt, scheme, dims)
        unwritable = sorted(
            {s for p in self.specs.values() for s, spec in p.items() if not spec.meta.get("encode")}
        )
        if unwritable:
            raise ConfigError(
                f"{fmt.where} declares no encode: for {unwritable}: it is read-only "
                "(quantize to format=msmodelslim or format=compressed_tensors)"
            )
        self.tmp = self.out.parent / f".{self.out.name}.partial"
        n = len(self.reader.shards)
        base = SHARD_BASE[fmt.metadata]
        self.names = [f"{base}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.index_name = f"{base}.safetensors.index.json"
        self.qtype = metadata.expert_type(scheme)
        self.alpha_method = (
            "none: alpha = 1 (no calibration)" if scheme.flags.get("activation_use_clip") else None
        )
        if self.alphas and scheme.flags.get("activation_use_clip"):
            self.alpha_method = (calibration or {}).get("method", "given")
        # Non-expert linears: the format's own W8A8 tensors (one projection, role w2: N, K as is).
        self.linear_flags = {**scheme.flags, "weight_bits": 8, "group_size": 0, "activation_use_clip": False}
        self.fingerprint = hashlib.sha256(
            json.dumps(
                [
                    metadata.VERSION,
                    scheme.signature(),
                    fmt.name,
                    fmt.tensors,
                    dict(self.model.proj_names),
                    self.targets,
                    self.ignore,
                    {k: v.tolist() for k, v in sorted(self.alphas.items())},
                    # the weight calibration: token source + seed, per-expert row counts
                    # (observer parameters are scheme flags, in the signature)
                    self.weight_data if self.observer_needs_data else None,
                ],
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()

    # ------------------------------------------------------------------ one projection / shard

    def _check_float(self, key: str, t: torch.Tensor, shape: tuple[int, ...], shard: str) -> None:
        where = self.reader.folder / shard
        if t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{where}: tensor '{key}' has dtype {t.dtype}, expected bf16, fp16 or fp32")
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{where}: tensor '{key}' has shape {list(t.shape)}, expected {list(shape)} (from config.json)"
            )
        # NaN / Inf are caught by quantize_weight from its amax (no extra pass here), see _encode.

    def _encode(
        self, prefix: str, expert: int, proj: str, w: torch.Tensor, out: dict, types: dict, src: str
    ) -> None:
        specs: dict[str, ParamSpec] = self.specs[proj]
        x = None
        if self.observer_needs_data:
            inputs = self.weight_inputs.get(_layer_of(prefix))
            x = inputs("w2" if proj == "down" else "w13", expert) if inputs is not None else None
        try:
            # bf16/fp16 go in as they are: the primitives convert to fp32 block by block.
            qw = quantize_weight(w, self.scheme.flags, x)
        except ConfigError:
            if not torch.isfinite(w).all():
                raise CheckpointError(f"{src}: contains NaN or Inf") from None
            raise
        if self.observer_needs_data:
            ratio = qw.info.get("clip_ratio")
            self._wc_records.append(  # list.append is atomic: worker threads share this list
                {
                    "layer": _layer_of(prefix),
                    "expert": expert,
                    "proj": proj,
                    "observer": qw.info["observer"],
                    "tokens": 0 if x is None else int(x.shape[0]),
                    "fallback": qw.info["fallback"],
                    "clip_ratio_mean": None if ratio is None else round(float(ratio.mean()), 6),
                }
            )
        del x
        where = f"{self.fmt.where} {prefix}.{expert}.{proj}"
        for suffix, t in encode_role(specs, qw, self._alpha(prefix, expert, proj), where).items():
            key = key_of(prefix, expert, self.model, proj, suffix)
            # Declared uint64 is stored as safetensors U64 (torch keeps it in int64, spec 1.5).
            out[key] = t.view(torch.uint64) if specs[suffix].meta.get("storage") == "uint64" else t
            types[key] = self.qtype

    def _jobs(self, shard: str) -> Iterator[tuple[str, torch.Tensor, list]]:
        """(key, tensor, [(prefix, expert, proj, view, src)] to quantize or [] to pass through)."""
        E = self.model.num_experts
        for key, t in self.reader.iter_shard(shard):
            parsed = parse_expert_key(key, self.model)
            fused = FUSED_RE.match(key)
            if parsed:
                prefix, _, expert, proj, suffix = parsed
                if suffix != "weight":
                    raise CheckpointError(
                        f"{self.reader.folder / shard}: routed-expert tensor '{key}' is not supported (only .weight; expert biases are not)"
                    )
                self._check_float(key, t, self.model.float_shape(proj), shard)
                yield key, t, [(prefix, expert, proj, t, f"{self.reader.folder / shard}: tensor '{key}'")]
            elif fused:
                prefix, name = fused["prefix"], fused["proj"]
                H, I = self.model.hidden_size, self.model.moe_intermediate_size
                shape = (E, 2 * I, H) if name == "gate_up_proj" else (E, H, I)
                self._check_float(key, t, shape, shard)
                parts = []
                for e in range(E):
                    src = f"{self.reader.folder / shard}: tensor '{key}' (expert {e})"
                    if name == "gate_up_proj":
                        parts += [(prefix, e, "gate", t[e, :I], src), (prefix, e, "up", t[e, I:], src)]
                    else:
                        parts.append((prefix, e, "down", t[e], src))
                yield key, t, parts
            elif self._is_target_linear(key, t):
                yield (
                    key,
                    t,
                    [
                        (
                            key[: -len(".weight")],
                            None,
                            "linear",
                            t,
                            f"{self.reader.folder / shard}: tensor '{key}'",
                        )
                    ],
                )
            else:
                yield key, t, []

    def _is_target_linear(self, key: str, t: torch.Tensor) -> bool:
        if not self.targets or not key.endswith(".weight") or t.dim() != 2 or t.dtype not in FLOAT_DTYPES:
            return False
        module = key[: -len(".weight")]
        return any(re.search(p, module) for p in self.targets) and not any(
            re.search(p, module) for p in self.ignore
        )

    def _alpha(self, prefix: str, expert: int, proj: str) -> torch.Tensor | None:
        """This expert's learned alpha (down_proj only), None = the encoder's alpha = 1."""
        layer = _layer_of(prefix)
        if proj != "down" or layer not in self.alphas:
            return None
        return self.alphas[layer][expert]

    def _encode_linear(self, module: str, w: torch.Tensor, out: dict, types: dict, src: str) -> None:
        """A non-expert linear [N, K] as W8A8 in the format's declared tensors (weight, scale, offset...)."""
        n, k = w.shape
        dims = Dims(E=1, H=n, I=k)
        specs = {
            name.split("_", 1)[1]: spec
            for name, spec in instantiate(
                self.fmt.tensors, dims, {**self.linear_flags, "G": 0}, self.fmt.where
            ).items()
            if spec.role == "w2"
        }
        try:
            qw = quantize_weight(w, self.linear_flags)
        except ConfigError:
            if not torch.isfinite(w).all():
                raise CheckpointError(f"{src}: contains NaN or Inf") from None
            raise
        for suffix, t in encode_role(specs, qw, None, f"{self.fmt.where} {module}").items():
            out[f"{module}.{suffix}"] = t
            types[f"{module}.{suffix}"] = metadata.LINEAR_W8A8

    def convert_shard(self, shard: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Quantize one input shard. Up to `self.workers` tensors are in flight (bounded memory);
        results are collected in key order, so the output does not depend on thread timing."""
        workers = self.workers or 1

        def work(key, t, parts):
            out: dict[str, torch.Tensor] = {}
            types: dict[str, str] = {}
            if not parts:
                return {key: t}, {key: metadata.FLOAT}
            for prefix, expert, proj, w, src in parts:
                if proj == "linear":
                    self._encode_linear(prefix, w, out, types, src)
                else:
                    self._encode(prefix, expert, proj, w, out, types, src)
            return out, types

        out: dict[str, torch.Tensor] = {}
        types: dict[str, str] = {}

        def collect(result):
            o, ty = result
            out.update(o)
            types.update(ty)

        if workers <= 1:
            for job in self._jobs(shard):
                collect(work(*job))
            return out, types
        pending: deque = deque()
        with ThreadPoolExecutor(workers) as pool:
            try:
                for job in self._jobs(shard):
                    pending.append(pool.submit(work, *job))
                    if len(pending) > workers:
                        collect(pending.popleft().result())
                while pending:
                    collect(pending.popleft().result())
            finally:
                for f in pending:
                    f.cancel()
        return out, types

    # ------------------------------------------------------------------ resume records

    def _record_path(self, i: int) -> Path:
        return self.tmp / f"{self.names[i]}.done.json"

    def _input_stamp(self, i: int) -> dict:
        st = (self.reader.folder / self.reader.shards[i]).stat()
        return {"input": self.reader.shards[i], "input_size": st.st_size, "input_mtime_ns": st.st_mtime_ns}

    def _finished(self, i: int, rehash: bool = True) -> dict | None:
        """The record of shard i if it is complete and verified (size and sha256), else None.

        rehash=False skips the sha256 for shards written or verified earlier in this same run."""
        rec_path, out_path = self._record_path(i), self.tmp / self.names[i]
        if not rec_path.is_file() or not out_path.is_file():
            return None
        try:
            rec = json.loads(rec_path.read_text())
        except ValueError:
            return None
        ok = (
            rec.get("fingerprint") == self.fingerprint
            and all(rec.get(k) == v for k, v in self._input_stamp(i).items())
            and rec.get("size") == out_path.stat().st_size
            and (not rehash or rec.get("sha256") == _sha256(out_path))
        )
        return rec if ok else None

    def _prepare_tmp(self) -> None:
        marker = self.tmp / MARKER
        if self.tmp.exists():
            try:
                old = json.loads(marker.read_text())
            except (OSError, ValueError):
                raise CheckpointError(
                    f"{self.tmp} exists but is not a quantfw partial output; remove it or choose another output"
                ) from None
            if old.get("fingerprint") == self.fingerprint and old.get("input") == str(
                self.reader.folder.resolve()
            ):
                return  # resume
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        marker.write_text(
            json.dumps({"fingerprint": self.fingerprint, "input": str(self.reader.folder.resolve())})
        )

    def _log(self, msg: str) -> None:
        if self.progress:
            print(f"quantfw quantize: {msg}", file=sys.stderr, flush=True)

    def _do_shard(self, i: int) -> tuple[dict[str, str], list[dict]] | None:
        """Convert and write shard i; its tensor types and weight-observer records for the record
        (None: verified, skipped)."""
        n = len(self.names)
        if self._finished(i) is not None:
            self._log(f"[{i + 1}/{n}] {self.names[i]} already done (verified), skipped")
            return None
        t0 = time.perf_counter()
        self._wc_records = []
        tensors, types = self.convert_shard(self.reader.shards[i])
        records = sorted(self._wc_records, key=lambda r: (r["layer"], r["expert"], r["proj"]))
        out_path = self.tmp / self.names[i]
        part = out_path.with_suffix(".tmp")
        save_file(tensors, str(part), metadata={"format": "pt"})
        del tensors
        os.replace(part, out_path)
        gb = self._input_stamp(i)["input_size"] / 1e9
        self._log(
            f"[{i + 1}/{n}] {self.names[i]} {gb:.3f} GB in {time.perf_counter() - t0:.2f} s (record pending)"
        )
        fell = sum(1 for r in records if r["fallback"])
        if records:
            self._log(f"[{i + 1}/{n}] weight observer: {len(records) - fell} data-driven, {fell} fallback")
        return types, records

    def _write_record(self, i: int, types: dict[str, str], records: list[dict] | None = None) -> None:
        out_path = self.tmp / self.names[i]
        rec = {
            **self._input_stamp(i),
            "fingerprint": self.fingerprint,
            "size": out_path.stat().st_size,
            "sha256": _sha256(out_path),
            "tensors": types,
            "weight_calibration": records or [],
        }
        self._record_path(i).write_text(json.dumps(rec))

    def _finalize(self, done: list[bool]) -> None:
        weight_map: dict[str, str] = {}
        types: dict[str, str] = {}
        total = 0
        records: list[dict] = []
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
        metadata.dump(self.tmp / self.index_name, index)
        prov = metadata.provenance(self.scheme, self.fmt.name, self.alpha_method)
        if self.calibration is not None:
            prov["alpha_calibration"] = self.calibration
        if self.observer_needs_data:
            prov["weight_calibration"] = weight_calibration_metadata(
                self.scheme.flags, records, self.weight_data
            )
        if self.targets:
            modules = sorted(
                k[: -len(".weight")]
                for k, t in types.items()
                if t == metadata.LINEAR_W8A8 and k.endswith(".weight") and not parse_expert_key(k, self.model)
            )
            every = sorted({k[: -len(".weight")] for k in weight_map if k.endswith(".weight")})
            unmatched = {
                "targets": [p for p in self.targets if not any(re.search(p, m) for m in modules)],
                "ignore": [p for p in self.ignore if not any(re.search(p, m) for m in every)],
            }
            prov["linears"] = {
                "targets": self.targets,
                "ignore": self.ignore,
                "w8a8": modules,
                "unmatched": unmatched,
            }
            self._log(f"{len(modules)} non-expert linear(s) W8A8; patterns matching nothing: {unmatched}")
        metadata.write(self.fmt.metadata, self.tmp, self.config, self.scheme, types, prov)
        for p in sorted(self.reader.folder.iterdir()):  # tokenizer, generation config, ...
            if (
                p.is_file()
                and not p.name.endswith((".safetensors", ".index.json"))
                and not (self.tmp / p.name).exists()
            ):
                shutil.copyfile(p, self.tmp / p.name)
        for i in range(len(self.names)):
            self._record_path(i).unlink()
        (self.tmp / MARKER).unlink()
        if self.out.exists():
            shutil.rmtree(self.out) if self.out.is_dir() else self.out.unlink()
        os.replace(self.tmp, self.out)

    def run(self, dist: Dist | None = None) -> Path:
        dist = dist or Dist()
        error: QuantfwError | None = None
        try:
            if dist.rank == 0:
                self._prepare_tmp()
        except QuantfwError as e:
            error = e
        if dist.any_failed(error is not None):
            raise error or CheckpointError("quantize failed on rank 0 (see its error)")
        dist.barrier()
        done = [False] * len(self.names)
        self.workers = self.workers or default_workers(dist.world)
        try:
            with _torch_threads(1), ThreadPoolExecutor(1) as hasher:
                records = []
                for i in range(dist.rank, len(self.names), dist.world):
                    result = self._do_shard(i)
                    if result is not None:
                        records.append(hasher.submit(self._write_record, i, *result))
                    done[i] = True
                for r in records:
                    r.result()
        except QuantfwError as e:
            error = e
        if dist.any_failed(error is not None):
            # Bad input: nothing worth resuming; leave no partial output behind.
            dist.barrier()
            if dist.rank == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise error or CheckpointError("quantize failed on another rank (see its error)")
        done = dist.union(done)
        if dist.rank == 0:
            self._finalize(done)
            self._log(f"wrote {self.out}")
        dist.barrier()
        return self.out


def quantize_checkpoint(
    input: str | Path,
    output: str | Path,
    scheme: Scheme,
    fmt: Format,
    overwrite: bool = False,
    proj_names: Mapping[str, str] | None = None,
    progress: bool = True,
    dist: Dist | None = None,
    workers: int | None = None,
    targets: Sequence[str] = (),
    ignore: Sequence[str] = (),
    alphas: Mapping[int, torch.Tensor] | None = None,
    calibration: dict | None = None,
    weight_inputs: Mapping[int, CalibrationInputs] | None = None,
    weight_data: dict | None = None,
) -> Path:
    """Quantize every routed expert of a float checkpoint folder into `output` (see module doc).

    workers: quantize threads per process (default: usable cores / local torchrun ranks).
    targets / ignore: regexes over non-expert module names to write W8A8 (recipe `quantize.*`).
    alphas / calibration: learned W4A8-clip alphas per MoE layer and how they were obtained.
    weight_inputs / weight_data: per-layer calibration inputs of a data-driven weight observer
    (`CalibrationResult.inputs` / `.data`); its report lands in the metadata as weight_calibration."""
    conv = Converter(
        input,
        output,
        scheme,
        fmt,
        overwrite,
        proj_names,
        progress,
        workers,
        targets,
        ignore,
        alphas,
        calibration,
        weight_inputs,
        weight_data,
    )
    return conv.run(dist)
