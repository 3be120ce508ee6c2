"""The partial output folder of a conversion: a marker naming the run, one verified record per
finished output shard (input stamp, size, sha256, the run's fingerprint), and the final rename.

Output goes to a hidden `.NAME.partial` folder next to the target; a shard counts as done only
when its record matches the file, so an interrupted run resumes where it stopped and a changed
input or recipe starts over. The folder becomes the target only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from quantfw.errors import CheckpointError

MARKER = "quantfw-partial.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


class ShardStore:
    def __init__(self, out: Path, fingerprint: str, source: Path):
        self.out = out
        self.tmp = out.parent / f".{out.name}.partial"
        self.fingerprint = fingerprint
        self.source = str(source.resolve())

    def path(self, name: str) -> Path:
        return self.tmp / name

    def record_path(self, name: str) -> Path:
        return self.tmp / f"{name}.done.json"

    def prepare(self) -> None:
        """Reuse a partial folder of the same run (resume) or start a fresh one."""
        marker = self.tmp / MARKER
        if self.tmp.exists():
            try:
                old = json.loads(marker.read_text())
            except (OSError, ValueError):
                raise CheckpointError(
                    f"{self.tmp} exists but is not a quantfw partial output; remove it or choose another output"
                ) from None
            if old.get("fingerprint") == self.fingerprint and old.get("input") == self.source:
                return  # resume
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        marker.write_text(json.dumps({"fingerprint": self.fingerprint, "input": self.source}))

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
            rec.get("fingerprint") == self.fingerprint
            and all(rec.get(k) == v for k, v in stamp.items())
            and rec.get("size") == out_path.stat().st_size
            and (not rehash or rec.get("sha256") == sha256(out_path))
        )
        return rec if ok else None

    def write_record(self, name: str, stamp: dict, content: dict) -> None:
        out_path = self.path(name)
        rec = {
            **stamp,
            "fingerprint": self.fingerprint,
            "size": out_path.stat().st_size,
            "sha256": sha256(out_path),
            **content,
        }
        self.record_path(name).write_text(json.dumps(rec))

    def commit(self, names: list[str]) -> None:
        """Drop the records and the marker, then move the folder onto the target."""
        for name in names:
            self.record_path(name).unlink()
        (self.tmp / MARKER).unlink()
        if self.out.exists():
            shutil.rmtree(self.out) if self.out.is_dir() else self.out.unlink()
        os.replace(self.tmp, self.out)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
