"""Output shards are written once, header first, and hashed on the way (quantize/shard_plan.py,
quantize/store.py ShardWriter); a plan that misses still gives the same bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import SCHEMES, quantize, reshard
from safetensors.torch import load_file

from quantfw.api import components
from quantfw.config.compose import compose
from quantfw.io.fp8_release import write_fp8_release
from quantfw.quantize import checkpoint, store
from quantfw.quantize.checkpoint import quantize_checkpoint

pytest.importorskip("transformers")
from quantfw.integrations.hf import save_tiny_checkpoint  # noqa: E402


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("writer")
    plain = save_tiny_checkpoint("deepseek_v3", root / "bf16")
    return {
        "bf16": reshard(plain, root / "bf16-3", 3),
        "fp8": write_fp8_release(plain, root / "fp8", (32, 16)),
    }


@pytest.fixture
def writes(monkeypatch):
    """Every closed shard: (path, digest, rewritten)."""
    seen = []
    real_close, real_rewrite = store.ShardWriter.close, store.ShardWriter._rewrite

    def close(self):
        real_close(self)
        seen.append([self.path, self.digest, False])

    def rewrite(self, head):
        real_rewrite(self, head)
        seen.append([self.path, None, True])

    monkeypatch.setattr(store.ShardWriter, "close", close)
    monkeypatch.setattr(store.ShardWriter, "_rewrite", rewrite)
    return seen


CASES = {
    "w4a8_clip compressed_tensors": ("clip", {}),
    "w4a8 g256": ("w4a8", {}),
    "w8a8 with targets": ("w8a8", {"targets": [r"self_attn", r"shared_experts"]}),
    "w4a8 per channel": ("w4a8_pc", {}),
}


@pytest.mark.parametrize("source", ["bf16", "fp8"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_shard_is_written_once_with_its_sha256(source, case, inputs, writes, tmp_path):
    scheme, kw = CASES[case]
    out = quantize(inputs[source], tmp_path / "out", scheme, **kw)
    shards = sorted(out.glob("*.safetensors"))
    assert len(writes) == len(shards) >= 1
    for path, digest, rewritten in writes:
        assert not rewritten and digest is not None, path
        final = out / path.name
        assert digest == hashlib.sha256(final.read_bytes()).hexdigest()
        assert load_file(str(final))  # a valid safetensors file


def test_layer_choices_are_planned_too(inputs, writes, tmp_path):
    s, f, _ = components(compose("default", [*SCHEMES["clip"]]))
    w8 = components(compose("default", SCHEMES["w8a8"]))[0]
    quantize_checkpoint(inputs["fp8"], tmp_path / "out", s, f, progress=False, layers={1: w8})
    assert writes and all(d is not None and not r for _, d, r in writes)


def _wrong(kind):
    def plan(router, encoder_of, default, shard):
        p = real_plan(router, encoder_of, default, shard)
        key, dtype, shape = p[0]
        if kind == "renamed":  # same header length, another key
            return [(key[:-1] + ("x" if key[-1] != "x" else "y"), dtype, shape), *p[1:]]
        if kind == "missing":  # shorter header
            return p[1:]
        return [*p, ("model.extra.weight", torch.float32, (3, 5))]  # longer header

    return plan


real_plan = checkpoint.plan_shard


@pytest.mark.parametrize("kind", ["renamed", "missing", "extra"])
def test_a_plan_that_misses_writes_the_same_bytes(kind, inputs, writes, tmp_path, monkeypatch):
    good = quantize(inputs["fp8"], tmp_path / "good", "w4a8_pc")
    writes.clear()
    monkeypatch.setattr(checkpoint, "plan_shard", _wrong(kind))
    bad = quantize(inputs["fp8"], tmp_path / "bad", "w4a8_pc")
    assert files(bad) == files(good)
    assert writes and all(d is None for _, d, _ in writes)
    assert any(r for _, _, r in writes) == (kind != "renamed")  # same length: header rewritten in place
