"""Where a conversion writes: the partial output folder, its lock and the journaled commit.

Output goes to a hidden `.NAME.partial` folder next to the target, with a marker naming the run
and one verified record per finished shard (input stamp, size, sha256, the run's fingerprint):
an interrupted run resumes where it stopped, a changed input or recipe starts over. Every file is
written under a temporary name and renamed, so a kill at any point leaves whole files only.

Siblings of the target, all hidden and all quantfw's own:
- `.NAME.lock`: held (flock) by the one process writing this output; its text names the holder.
  The kernel drops the flock when the holder dies, so a lock left by a dead process is taken over.
- `.NAME.commit.json`: the journal of the final replacement. Written once the partial folder holds
  the complete output; the commit (drop records and marker, move an old output to `.NAME.old`,
  rename the partial folder onto the target, delete `.NAME.old`) is a sequence of idempotent steps
  that any later run completes before doing anything else.

The target is only ever replaced when it is absent, an empty folder or a quantfw output.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import queue
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import torch

from quantfw.errors import CheckpointError, OutputKeptError
from quantfw.io.metadata import produced_by_quantfw

MARKER = "quantfw-partial.json"
RECORD_SUFFIX = ".done.json"

# Test hook, inert unless set: QUANTFW_CRASH_AT=N SIGKILLs this process at its Nth durable step.
_CRASH_AT = int(os.environ.get("QUANTFW_CRASH_AT") or 0)
_steps = 0
_steps_lock = threading.Lock()


def step() -> None:
    """One durable change of the output is on disk (a file written, renamed or removed)."""
    global _steps
    with _steps_lock:
        _steps += 1
        if _steps == _CRASH_AT:
            os.kill(os.getpid(), signal.SIGKILL)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _create(path: Path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    return open(fd, "wb")


def write_atomic(path: Path, data: bytes | Callable) -> None:
    """`path` holds `data` (bytes, or what `data(file)` writes) or what it held before, never a part of it."""
    part = path.with_name(path.name + ".tmp")
    with _create(part) as f:
        data(f) if callable(data) else f.write(data)
    os.replace(part, path)
    step()


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.uint64: "U64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
}  # fmt: skip


def _header(metadata: dict[str, str], entries: dict[str, dict]) -> bytes:
    head = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
    return len(head).to_bytes(8, "little") + head


def _entries(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> dict[str, dict]:
    entries, size = {}, 0
    for key, dtype, shape in tensors:
        n = math.prod(shape) * dtype.itemsize
        entries[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [size, size + n]}
        size += n
    return entries


class ShardWriter:
    """A safetensors shard written tensor by tensor, so memory holds the tensors in flight, not
    the shard. A writer thread writes (and hashes) the data while the caller goes on.

    With a plan (quantize/shard_plan.py) the header is written first and every byte once, hashed
    on the way: `digest` is the file's sha256. Without one, or when a tensor differs from the
    plan, the header goes in last: in place if its length is unchanged, else before a kernel-side
    copy of the data (`digest` None). The file only appears under its name when complete."""

    QUEUE_BYTES = 256 << 20  # data handed to the writer thread and not yet written

    def __init__(self, path: Path, metadata: dict[str, str], planned=None):
        self.path, self.metadata = path, metadata
        self.data_path = path.with_name(path.name + ".data.tmp")
        self.data = _create(self.data_path)
        self.entries: dict[str, dict] = {}
        self.size = 0
        self.planned = list(_entries(planned).items()) if planned is not None else None
        self.head = _header(metadata, dict(self.planned)) if self.planned is not None else b""
        self.hash = hashlib.sha256(self.head) if self.planned is not None else None
        self.digest: str | None = None
        self.data.write(self.head)
        self._queue: queue.Queue = queue.Queue()
        self._queued = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="shard-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            buf, n = item
            try:
                if self._error is None:
                    self.data.write(buf)
                    if self.hash is not None:
                        self.hash.update(buf)
            except BaseException as e:  # reported to the caller at its next add or close
                self._error = e
            with self._cond:
                self._queued -= n
                self._cond.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, t in tensors.items():
            self._raise_error()
            n = t.numel() * t.element_size()
            offsets = [self.size, self.size + n]
            entry = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": offsets}
            if self.planned is not None:
                k = len(self.entries)
                if k >= len(self.planned) or self.planned[k] != (key, entry):
                    self.hash = None  # the plan was wrong: the header is rewritten at close
                    self.planned = None
            self.entries[key] = entry
            self.size += n
            if not n:
                continue
            with self._cond:
                while self._queued and self._queued + n > self.QUEUE_BYTES:
                    self._cond.wait()
                self._queued += n
            self._queue.put((memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()), n))

    def _finish_writes(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_error()

    def close(self) -> None:
        self._finish_writes()
        planned = self.planned is not None and len(self.planned) == len(self.entries)
        head = self.head if planned else _header(self.metadata, self.entries)
        if planned:
            self.data.close()
            self.digest = self.hash.hexdigest()
        elif len(head) == len(self.head):
            os.pwrite(self.data.fileno(), head, 0)
            self.data.close()
        else:
            self.data.close()
            self._rewrite(head)
            return
        os.replace(self.data_path, self.path)
        step()

    def _rewrite(self, head: bytes) -> None:
        """The shard with header `head` and the data written behind the planned header."""

        def join(f):
            f.write(head)
            f.flush()
            with open(self.data_path, "rb") as src:
                left, pos = self.size, len(self.head)
                while left:
                    sent = os.copy_file_range(src.fileno(), f.fileno(), left, pos)
                    if sent == 0:
                        raise OSError(errno.EIO, "short copy", str(self.path))
                    left, pos = left - sent, pos + sent

        write_atomic(self.path, join)
        self.data_path.unlink()

    def abort(self) -> None:
        with suppress(BaseException):
            self._finish_writes()
        self.data.close()
        self.data_path.unlink(missing_ok=True)


def os_error(e: OSError, kept: Path) -> OutputKeptError:
    """One line for an OS error while converting (disk full, permission, not a directory...)."""
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    what = f"{e.strerror or e}" + (f" [{code}]" if code else "")
    state = (
        f"the partial output {kept} is kept: fix this and rerun the same command to resume"
        if kept.is_dir()
        else "nothing was converted yet"
    )
    return OutputKeptError(f"{e.filename or kept}: {what}; {state}")


def check_apart(source: Path, paths: list[Path]) -> None:
    """Refuse output paths that equal, contain or lie inside the input (symlinks resolved)."""
    src = source.resolve()
    for p in paths:
        p = p.resolve()
        how = (
            "is the input folder"
            if p == src
            else f"lies inside the input {src}"
            if p.is_relative_to(src)
            else f"contains the input {src}"
            if src.is_relative_to(p)
            else None
        )
        if how:
            raise CheckpointError(f"output {p} {how} (input {src}); choose an output outside the input")


class OutputLock:
    """An exclusive flock on `.NAME.lock`; the file's text names the holder for a second run."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    @staticmethod
    def _holder() -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv),
        }

    @staticmethod
    def describe(h: dict) -> str:
        return (
            f"pid {h.get('pid')} on {h.get('host')} since {h.get('started')} ({h.get('command')})"
            if h
            else "an unknown process"
        )

    def _read(self, fd: int) -> dict:
        try:
            h = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        except ValueError:
            return {}
        return h if isinstance(h, dict) else {}

    def acquire(self, log: Callable[[str], None]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise CheckpointError(
                    f"{self.path}: another quantize is writing this output: {self.describe(holder)}; "
                    "wait for it or stop it"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (unlinked) it between our open and flock
                os.close(fd)
                continue
            old = self._read(fd)
            if old:
                log(f"lock {self.path} was left by {self.describe(old)}, no longer running; taking it over")
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self._holder()).encode(), 0)
            self.fd = fd
            return

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


class ShardStore:
    def __init__(self, out: Path, fingerprint: str, source: Path):
        self.out = out
        self.tmp = out.parent / f".{out.name}.partial"
        self.old = out.parent / f".{out.name}.old"
        self.journal = out.parent / f".{out.name}.commit.json"
        self.lock = OutputLock(out.parent / f".{out.name}.lock")
        self.fingerprint = fingerprint
        self.source = str(source.resolve())
        check_apart(source, [self.out, self.tmp, self.old, self.journal, self.lock.path])

    def path(self, name: str) -> Path:
        return self.tmp / name

    def record_path(self, name: str) -> Path:
        return self.tmp / f"{name}{RECORD_SUFFIX}"

    def is_bookkeeping(self, name: str) -> bool:
        """A file name the store itself uses inside the partial folder."""
        return name.startswith(MARKER) or name.endswith((RECORD_SUFFIX, ".tmp"))

    # ------------------------------------------------------------------ start

    def check_target(self, overwrite: bool) -> None:
        """Replace only nothing, an empty folder or (overwrite=true) a quantfw output."""
        out = self.out
        if not out.exists():
            return
        if not out.is_dir():
            raise CheckpointError(
                f"output {out} exists and is not a folder; remove it or choose another output"
            )
        if not any(out.iterdir()):
            return
        if not overwrite:
            raise CheckpointError(f"output {out} exists and is not empty (pass overwrite=true to replace it)")
        if not produced_by_quantfw(out):
            raise CheckpointError(
                f"output {out} exists, is not empty and holds no quantfw checkpoint (no quantfw metadata); "
                "overwrite=true replaces only a quantfw output: remove it yourself or choose another output"
            )

    def prepare(self, overwrite: bool, log: Callable[[str], None]) -> bool:
        """Under the lock: finish an interrupted commit first (True: it was this very run, the
        output is complete); then reuse a partial folder of the same run (resume) or start fresh."""
        if self.journal.exists():
            same = self._read_journal().get("run") == self._run()
            self._complete_commit()
            if same:
                log(f"completed the interrupted final rename into {self.out}")
                return True
            log(f"completed the interrupted final rename of an earlier run into {self.out}")
        self.check_target(overwrite)
        marker = self.tmp / MARKER
        if self.tmp.exists():
            try:
                old = json.loads(marker.read_text())
            except (OSError, ValueError):
                if not self._only_leftovers():
                    raise CheckpointError(
                        f"{self.tmp} exists but is not a quantfw partial output; remove it or choose another output"
                    ) from None
                old = None
            if old == self._run():
                return False  # resume
            self._clear(self.tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, json.dumps(self._run()).encode())
        return False

    def _run(self) -> dict:
        return {"fingerprint": self.fingerprint, "input": self.source}

    def _only_leftovers(self) -> bool:
        """An empty partial folder or one killed while its marker was being written."""
        return all(p.name == MARKER + ".tmp" for p in self.tmp.iterdir())

    def _clear(self, folder: Path) -> None:
        """Delete a partial folder, its marker last: a kill meanwhile leaves a marked folder."""
        for p in folder.iterdir():
            if p.name != MARKER:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        (folder / MARKER).unlink(missing_ok=True)
        folder.rmdir()

    # ------------------------------------------------------------------ shards

    def shard_writer(self, name: str, metadata: dict[str, str], planned=None) -> ShardWriter:
        # Written by Python, so a short write (disk full) raises OSError; safetensors' save_file
        # can end on a truncated file without an error.
        return ShardWriter(self.path(name), metadata, planned)

    def finished(self, name: str, stamp: dict, rehash: bool = True) -> dict | None:
        """The record of shard `name` if it is complete and verified (size and sha256), else None.

        rehash=False skips the sha256 for shards written or verified earlier in this same run."""
        rec_path, out_path = self.record_path(name), self.path(name)
        if not rec_path.is_file() or not out_path.is_file():
            return None
        try:
            rec = json.loads(rec_path.read_text())
        except ValueError:
            return None
        ok = (
            isinstance(rec, dict)
            and rec.get("fingerprint") == self.fingerprint
            and all(rec.get(k) == v for k, v in stamp.items())
            and rec.get("size") == out_path.stat().st_size
            and (not rehash or rec.get("sha256") == sha256(out_path))
        )
        return rec if ok else None

    def write_record(self, name: str, stamp: dict, content: dict, digest: str | None = None) -> None:
        """digest: the shard's sha256 if the writer computed it (else it is read back)."""
        out_path = self.path(name)
        rec = {
            **stamp,
            "fingerprint": self.fingerprint,
            "size": out_path.stat().st_size,
            "sha256": digest or sha256(out_path),
            **content,
        }
        write_atomic(self.record_path(name), json.dumps(rec).encode())

    def copy_in(self, src: Path) -> None:
        """A file of the input, as it is, into the partial folder."""
        part = self.tmp / (src.name + ".tmp")
        shutil.copyfile(src, part)
        os.replace(part, self.tmp / src.name)
        step()

    # ------------------------------------------------------------------ commit

    def commit(self, names: list[str]) -> None:
        """The partial folder holds the complete output: journal it, then replace the target."""
        write_atomic(self.journal, json.dumps({"run": self._run(), "shards": names}).encode())
        self._complete_commit()

    def _read_journal(self) -> dict:
        try:
            j = json.loads(self.journal.read_text())
        except ValueError:
            j = None  # written atomically: garbage is not ours
        if not isinstance(j, dict) or not isinstance(j.get("shards"), list):
            raise CheckpointError(
                f"{self.journal}: not a quantfw commit journal; remove it or choose another output"
            )
        return j

    def _complete_commit(self) -> None:
        """Each step is skipped when done already, so a rerun after a kill anywhere finishes it."""
        j = self._read_journal()
        if self.tmp.is_dir():
            for name in j["shards"]:
                if self.record_path(name).exists():
                    self.record_path(name).unlink()
                    step()
            if (self.tmp / MARKER).exists():
                (self.tmp / MARKER).unlink()
                step()
            if self.out.exists():  # the previous output, checked replaceable when this run began
                if self.old.exists():
                    shutil.rmtree(self.old)
                os.replace(self.out, self.old)
                step()
            os.replace(self.tmp, self.out)
            step()
        if self.old.exists():
            shutil.rmtree(self.old)
            step()
        self.journal.unlink()
        step()

    def discard(self) -> None:
        """Bad input: nothing worth resuming."""
        if self.tmp.is_dir():
            self._clear(self.tmp)
