"""The calibration work dir: per-layer spills, hidden states and the resume state.

state.json holds a fingerprint of everything the calibration depends on (input config and shard
stamps, scheme, calibration settings, seed, token ids) and, per finished layer, its files with
their sha256. A run whose fingerprint differs starts afresh; a file whose checksum fails makes the
run restart at the first layer it cannot trust.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantfw.quantize.store import sha256

__all__ = ["WorkDir", "sha256"]

STATE = "state.json"


class WorkDir:
    def __init__(self, path: str | Path, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint
        state = self._read()
        if state is None or state.get("fingerprint") != fingerprint:
            if self.path.exists():
                shutil.rmtree(self.path)
            state = {"fingerprint": fingerprint, "layers": {}}
        self.path.mkdir(parents=True, exist_ok=True)
        self.state = state

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / STATE).read_text())
        except (OSError, ValueError):
            return None

    def _write_state(self) -> None:
        tmp = self.path / (STATE + ".tmp")
        tmp.write_text(json.dumps(self.state, sort_keys=True))
        os.replace(tmp, self.path / STATE)

    def save(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> dict:
        """Write one safetensors file atomically; its record {file, sha256}."""
        path = self.path / name
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return {"file": name, "sha256": sha256(path)}

    def verified(self, record: dict) -> Path | None:
        path = self.path / record["file"]
        return path if path.is_file() and sha256(path) == record["sha256"] else None

    def finish_layer(self, layer: int, files: dict[str, dict], drop: list[str] = ()) -> None:
        """Layer `layer` is done: its records ({"spill": record or None, "hidden": [records]}) enter
        the state; files in `drop` (the previous layer's hidden states) are deleted after."""
        self.state["layers"][str(layer)] = files
        self._write_state()
        for name in drop:
            (self.path / name).unlink(missing_ok=True)

    def resume_point(self) -> int:
        """How many leading layers are finished; 0 (and a clean state) when a file fails its checksum."""
        layers = self.state["layers"]
        done = 0
        while str(done) in layers:
            done += 1
        spills = [layers[str(i)]["spill"] for i in range(done) if layers[str(i)].get("spill")]
        hidden = layers[str(done - 1)]["hidden"] if done else []
        if not all(self.verified(r) for r in spills + hidden):
            done = 0
        self.state["layers"] = {k: v for k, v in layers.items() if int(k) < done}
        return done

    @staticmethod
    def load(
        path: Path, keys: tuple[str, ...] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors (all, or those of `keys` the file has) and metadata of a work-dir file."""
        with safe_open(path, framework="pt") as f:
            names = [k for k in f.keys() if keys is None or k in keys]
            return {k: f.get_tensor(k) for k in names}, f.metadata() or {}
