"""A read-only view of a safetensors checkpoint folder (spec section 8).

Shards are found through an index (`model.safetensors.index.json`,
`quant_model_weight_*.safetensors.index.json`, or any `*.safetensors.index.json`) or, without one,
as every `*.safetensors` in the folder. Every shard's header is parsed when the reader opens, so a
corrupt file, a missing shard, a tensor the index promises but the shard lacks, or one a shard
holds that the index does not list fails before any output is written. Tensors are read lazily,
one at a time (peak memory ~ the tensors in use).

The folder is a stranger's data: every file read lies inside it after symlinks are resolved and
is a regular file (`CheckpointReader.path`), and its JSON is typed strictly (quantfw.io.fields).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from safetensors import safe_open

import quantfw.vml_init  # noqa: F401  (before any tensor math)
from quantfw.errors import CheckpointError
from quantfw.io.fields import Fields

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
    span: tuple[int, int] = (0, 0)  # byte range of its data in the shard file


# JSON files are parsed whole: bound them (a 90k-tensor index is ~10 MB).
MAX_JSON_BYTES = 64 << 20
INDEX_SUFFIX = ".safetensors.index.json"


def _index_names(folder: Path) -> list[str]:
    """Index file names present (as directory entries, not yet verified), preferred first."""
    present = {p.name for p in folder.iterdir() if p.name.endswith(INDEX_SUFFIX)}
    preferred = ["model" + INDEX_SUFFIX, *sorted(n for n in present if n.startswith("quant_model_weight_"))]
    found = [n for n in preferred if n in present]
    return found or sorted(present)


def _data_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte range of every tensor's data, from a header safetensors has validated."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    base = 8 + n
    return {
        k: (base + v["data_offsets"][0], base + v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
    }


class CheckpointReader:
    """Lazy reader of one checkpoint folder: `keys()`, `info(key)`, `get(key)`, `shards`, `json(name)`.

    Every file it reads goes through `path()`: a relative name inside the folder that resolves
    (symlinks followed) to a regular file inside the folder. `collect=True` gathers every
    inconsistency between the index and the shards into `problems` instead of raising at the
    first (`quantfw check`); the view is then what the shards really hold.
    """

    def __init__(self, folder: str | Path, collect: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} does not exist or is not a directory")
        self.root = self.folder.resolve()
        self.problems: list[str] = []
        self._paths: dict[str, Path] = {}  # shard name -> verified path
        self._where: dict[str, str] = {}  # tensor -> shard file name
        self._info: dict[str, TensorInfo] = {}
        indexes = _index_names(self.folder)
        if indexes:
            self.index = indexes[0]
            listed = self._read_index(self.index)
            self.shards = sorted(set(listed.values()))
        else:
            self.index = None
            listed = None
            self.shards = sorted(p.name for p in self.folder.iterdir() if p.name.endswith(".safetensors"))
        if not self.shards:
            raise CheckpointError(f"{self.folder}: no *.safetensors files and no safetensors index")
        headers = {}
        missing = []  # reported first: they explain the tensors that follow
        for shard in self.shards:
            path = self.path(
                shard, f"shard listed in {self.index}" if listed else "shard", missing_ok=bool(listed)
            )
            if path is None:
                missing.append(f"{self.folder / shard}: shard listed in {self.index} is missing")
                continue
            self._paths[shard] = path
            headers[shard] = self._read_header(shard)
        self.shards = list(headers)
        for shard, header in headers.items():
            for key, info in header.items():
                if key in self._info:
                    self.problems.append(
                        f"{self.folder / shard}: tensor '{key}' is also in {self._info[key].shard}"
                    )
                    continue
                self._info[key] = info
                self._where[key] = shard
        if listed is not None:
            for key, shard in listed.items():
                if shard in headers and key not in headers[shard]:
                    self.problems.append(
                        f"{self.folder / shard}: tensor '{key}' is listed in {self.index} but absent from the shard"
                    )
            for key, info in self._info.items():
                if listed.get(key) != info.shard:
                    self.problems.append(
                        f"{self.folder / info.shard}: tensor '{key}' is in the shard but "
                        + (
                            f"{self.index} maps it to {listed[key]}"
                            if key in listed
                            else f"absent from {self.index}"
                        )
                    )
        self.problems[:0] = missing
        if self.problems and not collect:
            more = len(self.problems) - 1
            raise CheckpointError(
                self.problems[0]
                + (
                    f" (and {more} more inconsistencies: `quantfw check checkpoint=DIR` lists them all)"
                    if more
                    else ""
                )
            )

    def path(self, name: object, what: str, missing_ok: bool = False) -> Path | None:
        """The verified path of file `name` of this folder (the one place a read path is made).

        `name` must be a relative path without `..` that resolves, symlinks followed, to a regular
        file inside the folder. It is stat'ed, never opened, so a FIFO or device cannot block."""
        if not isinstance(name, str) or not name or "\0" in name:
            raise CheckpointError(f"{self.folder}: {what} {name!r} is not a file name")
        rel = PurePosixPath(name)
        if rel.is_absolute() or PureWindowsPath(name).drive or ".." in rel.parts:
            raise CheckpointError(
                f"{self.folder}: {what} '{name}' points outside the checkpoint folder (absolute or '..')"
            )
        entry = self.folder / name
        if not os.path.lexists(entry):
            if missing_ok:
                return None
            raise CheckpointError(f"{entry}: {what} is missing")
        try:
            real = entry.resolve(strict=True)
        except (OSError, RuntimeError):  # dangling or looping symlink
            if missing_ok:
                return None
            raise CheckpointError(f"{entry}: {what} is a broken or looping symlink") from None
        if not real.is_relative_to(self.root):
            raise CheckpointError(
                f"{entry}: {what} resolves to {real}, outside the checkpoint folder (symlinks must stay inside)"
            )
        mode = os.stat(real).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"{entry}: {what} is not a regular file (found a {_file_kind(mode)})")
        return real

    def _read_index(self, name: str) -> dict[str, str]:
        path = self.folder / name
        top = Fields(self._load_json(name, "safetensors index"), path)
        wm = top.obj("weight_map", required=True)
        for key, shard in wm.data.items():
            if not isinstance(shard, str):
                raise wm.fail(key, "a string (shard file name)", shard)
        return dict(wm.data)

    def _read_header(self, shard: str) -> dict[str, TensorInfo]:
        path = self.folder / shard
        try:
            with safe_open(self._paths[shard], framework="pt") as f:  # validates the header
                spans = _data_spans(self._paths[shard])
                out = {}
                for key in f.keys():
                    s = f.get_slice(key)
                    dtype = ST_DTYPES.get(s.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"{path}: tensor '{key}' has unsupported dtype {s.get_dtype()}")
                    out[key] = TensorInfo(tuple(s.get_shape()), dtype, shard, spans[key])
                return out
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' own error: truncated file, bad header
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})"
            ) from None

    def extra_files(self) -> list[Path]:
        """The other regular files of the folder (tokenizer, generation config, ...), verified as
        every read is, for a producer to copy next to its output. Shards and indexes are not
        included; subdirectories are skipped; a link pointing out or a FIFO is refused."""
        out = []
        for entry in sorted(self.folder.iterdir()):
            name = entry.name
            if name.endswith((".safetensors", ".index.json")):
                continue
            if entry.is_dir():  # follows links: a link to a directory must still stay inside
                if entry.is_symlink() and not entry.resolve().is_relative_to(self.root):
                    raise CheckpointError(
                        f"{entry}: extra file resolves to {entry.resolve()}, outside the checkpoint folder"
                    )
                continue
            self.path(name, "extra file")
            out.append(entry)
        return out

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
        """Several tensors, each shard opened once, read with plain reads (no mapping, no header
        parse: a scale_inv read per FP8 weight costs microseconds, not milliseconds)."""
        by_shard: dict[str, list[str]] = {}
        for k in keys:
            by_shard.setdefault(self._where[k], []).append(k)
        out = {}
        for shard, ks in by_shard.items():
            out.update(self._read_shard(shard, ks))
        return {k: out[k] for k in keys}

    def iter_shard(self, shard: str) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors of one shard in key order, read one at a time with plain reads, not a
        mapping of the file: the pages of a multi-GB shard never count toward the process's memory."""
        return self._read_shard(shard, sorted(self.keys_in(shard)))

    def _read_shard(self, shard: str, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        path = self.folder / shard
        try:
            with open(self._paths[shard], "rb", buffering=0) as f:
                for k in keys:
                    info = self._info[k]
                    # torch.empty, not bytearray: the read fills it, no zeroing pass first
                    t = torch.empty(info.span[1] - info.span[0], dtype=torch.uint8)
                    f.seek(info.span[0])
                    view, got = memoryview(t.numpy()), 0
                    while got < len(view):  # one read() returns at most ~2 GiB
                        n = f.readinto(view[got:])
                        if not n:
                            raise CheckpointError(f"{path}: tensor '{k}' is truncated")
                        got += n
                    yield k, t.view(info.dtype).reshape(info.shape)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read tensors ({e.strerror or e})") from None

    def _load_json(self, name: str, what: str) -> Any:
        path = self.path(name, what)
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(
                f"{self.folder / name}: {what} is {size} bytes (at most {MAX_JSON_BYTES} read)"
            )
        try:
            return json.loads(path.read_bytes())
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{self.folder / name}: invalid JSON ({str(e).splitlines()[0]})") from None

    def json(self, name: str) -> dict[str, Any] | None:
        """A JSON object file of the folder (config.json, quant_model_description*.json), None if absent."""
        if not os.path.lexists(self.folder / name):
            return None
        data = self._load_json(name, "JSON file")
        Fields(data, self.folder / name)  # a JSON object, or one line naming the file
        return data

    def has(self, name: str) -> bool:
        """Whether the folder has an entry `name` (verified when it is read)."""
        return os.path.lexists(self.folder / name)

    def config(self) -> dict[str, Any]:
        cfg = self.json("config.json")
        if cfg is None:
            raise CheckpointError(
                f"{self.folder / 'config.json'}: missing (needed for the model dims and type)"
            )
        return cfg


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"
