"""A read-only view of a safetensors checkpoint folder (spec section 8).

Shards are found through an index (`model.safetensors.index.json`,
`quant_model_weight_*.safetensors.index.json`, or any `*.safetensors.index.json`) or, without one,
as every `*.safetensors` in the folder. Every shard's header is parsed when the reader opens, so a
corrupt file, a missing shard or a tensor the index promises but the shard lacks fails before any
output is written. Tensors are read lazily, one at a time (peak memory ~ the tensors in use).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from quantfw.errors import CheckpointError

# safetensors dtype names -> the torch dtype quantfw works with (U64 scales live in int64, spec 1.5).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "U64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,  # FP8 releases; dequantized with quantfw.io.fp8
}


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a stored tensor, known from the header alone (duck-types a tensor)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: str


def _index_files(folder: Path) -> list[Path]:
    preferred = [
        folder / "model.safetensors.index.json",
        *sorted(folder.glob("quant_model_weight_*.safetensors.index.json")),
    ]
    found = [p for p in preferred if p.is_file()]
    return found or sorted(folder.glob("*.safetensors.index.json"))


class CheckpointReader:
    """Lazy reader of one checkpoint folder: `keys()`, `info(key)`, `get(key)`, `shards`, `json(name)`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} does not exist or is not a directory")
        self._where: dict[str, str] = {}  # tensor -> shard file name
        self._info: dict[str, TensorInfo] = {}
        indexes = _index_files(self.folder)
        if indexes:
            listed = self._read_index(indexes[0])
            self.shards = sorted(set(listed.values()))
        else:
            listed = None
            self.shards = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not self.shards:
            raise CheckpointError(f"{self.folder}: no *.safetensors files and no safetensors index")
        for shard in self.shards:
            for key, info in self._read_header(shard).items():
                self._info[key] = info
                if listed is None:
                    self._where[key] = shard
        if listed is not None:
            for key, shard in listed.items():
                if key not in self._info or self._info[key].shard != shard:
                    raise CheckpointError(
                        f"{self.folder / shard}: tensor '{key}' is listed in {indexes[0].name} but absent from the shard"
                    )
            self._where = dict(listed)
            self._info = {k: v for k, v in self._info.items() if k in listed}

    def _read_index(self, path: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{path}: not a safetensors index (expected a JSON 'weight_map'): {e}"
            ) from None
        for shard in sorted(set(weight_map.values())):
            if not (self.folder / shard).is_file():
                raise CheckpointError(f"{self.folder / shard}: shard listed in {path.name} is missing")
        return weight_map

    def _read_header(self, shard: str) -> dict[str, TensorInfo]:
        path = self.folder / shard
        try:
            with safe_open(path, framework="pt") as f:
                out = {}
                for key in f.keys():
                    s = f.get_slice(key)
                    dtype = ST_DTYPES.get(s.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"{path}: tensor '{key}' has unsupported dtype {s.get_dtype()}")
                    out[key] = TensorInfo(tuple(s.get_shape()), dtype, shard)
                return out
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' own error: truncated file, bad header
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})"
            ) from None

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def info(self, key: str) -> TensorInfo:
        return self._info[key]

    def shard_of(self, key: str) -> str:
        return self._where[key]

    def keys_in(self, shard: str) -> list[str]:
        return [k for k, s in self._where.items() if s == shard]

    def get(self, key: str) -> torch.Tensor:
        """One tensor; U64 comes back as its int64 view."""
        if key not in self._where:
            raise CheckpointError(f"{self.folder}: tensor '{key}' not found")
        return next(iter(self.read_many([key]).values()))

    def read_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Several tensors, each shard opened once."""
        by_shard: dict[str, list[str]] = {}
        for k in keys:
            by_shard.setdefault(self._where[k], []).append(k)
        out = {}
        for shard, ks in by_shard.items():
            path = self.folder / shard
            try:
                with safe_open(path, framework="pt") as f:
                    for k in ks:
                        t = f.get_tensor(k)
                        out[k] = t.view(torch.int64) if t.dtype == torch.uint64 else t
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read tensors ({str(e).splitlines()[0]})") from None
        return {k: out[k] for k in keys}

    def iter_shard(self, shard: str) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors of one shard in key order, read one at a time."""
        path = self.folder / shard
        keys = sorted(self.keys_in(shard))
        with safe_open(path, framework="pt") as f:
            for k in keys:
                t = f.get_tensor(k)
                yield k, (t.view(torch.int64) if t.dtype == torch.uint64 else t)

    def json(self, name: str) -> dict[str, Any] | None:
        """A JSON file of the folder (config.json, quant_model_description*.json), None if absent."""
        path = self.folder / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise CheckpointError(f"{path}: invalid JSON ({e})") from None

    def config(self) -> dict[str, Any]:
        cfg = self.json("config.json")
        if cfg is None:
            raise CheckpointError(
                f"{self.folder / 'config.json'}: missing (needed for the model dims and type)"
            )
        return cfg
