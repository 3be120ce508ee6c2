"""Non-expert linears written W8A8 according to the recipe's quantize.targets / quantize.ignore."""

from __future__ import annotations

import json

import pytest
import torch

from quantfw import from_checkpoint
from quantfw.api import components
from quantfw.config.compose import compose
from quantfw.errors import ConfigError
from quantfw.integrations.hf import save_tiny_checkpoint
from quantfw.io.loader import check, open_checkpoint
from quantfw.io.reader import CheckpointReader
from quantfw.quantize.checkpoint import quantize_checkpoint

ATTN = "model.layers.0.self_attn.q_proj"
ROUTER = "model.layers.0.mlp.gate"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("f") / "qwen")


def _quantize(src, out, recipe):
    cfg = compose("default", recipe)
    s, f, _ = components(cfg)
    return quantize_checkpoint(
        src, out, s, f, progress=False, targets=list(cfg.quantize.targets), ignore=list(cfg.quantize.ignore)
    )


def test_msmodelslim_targets_and_default_ignore(src, tmp_path):
    # "mlp" would match the router gate too: the default ignore keeps it float.
    out = _quantize(
        src,
        tmp_path / "q",
        ["scheme=w8a8", "format=msmodelslim", "quantize.targets=[self_attn,mlp\\.gate$,nomatch]"],
    )
    r, f = CheckpointReader(out), CheckpointReader(src)
    w = f.get(f"{ATTN}.weight").float()
    q, s, z = (r.get(f"{ATTN}.{x}") for x in ("weight", "weight_scale", "weight_offset"))
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (w.shape[0], 1) and torch.equal(z, torch.zeros_like(s))
    assert torch.equal(s[:, 0], w.abs().amax(-1) / 127)
    assert torch.equal(q, torch.round(w / s).clamp(-127, 127).to(torch.int8))
    assert r.get(f"{ROUTER}.weight").dtype == f.get(f"{ROUTER}.weight").dtype  # router untouched
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc[f"{ATTN}.weight"] == desc[f"{ATTN}.weight_scale"] == "W8A8_DYNAMIC"
    assert desc[f"{ROUTER}.weight"] == "FLOAT" and desc["model.norm.weight"] == "FLOAT"
    lin = desc["quantfw"]["linears"]
    assert ATTN in lin["w8a8"] and ROUTER not in lin["w8a8"]
    assert all("self_attn" in m for m in lin["w8a8"])
    assert lin["unmatched"]["targets"] == [
        "mlp\\.gate$",
        "nomatch",
    ]  # the gate only matched an ignored module
    assert check(open_checkpoint(out)) == []
    from_checkpoint(out)  # experts still load


def test_compressed_tensors_group_0_linear_and_ignore(src, tmp_path):
    out = _quantize(
        src, tmp_path / "q", ["scheme=w4a8_clip", "format=compressed_tensors", "quantize.targets=[self_attn]"]
    )
    r = CheckpointReader(out)
    assert r.get(f"{ATTN}.weight").dtype == torch.int8
    assert r.get(f"{ATTN}.weight_scale").dtype == torch.float32 and f"{ATTN}.weight_offset" not in r
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    g0 = qc["config_groups"]["group_0"]
    assert (
        g0["targets"] == ["Linear"]
        and g0["weights"]["num_bits"] == 8
        and g0["weights"]["strategy"] == "channel"
    )
    assert qc["config_groups"]["group_1"]["targets"] == ["MoEGMM"]
    assert ROUTER in qc["ignore"] and "lm_head" in qc["ignore"] and ATTN not in qc["ignore"]
    assert check(open_checkpoint(out)) == []


def test_no_targets_writes_no_linear_group(src, tmp_path):
    out = _quantize(src, tmp_path / "q", ["scheme=w4a8_clip", "format=compressed_tensors"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "group_0" not in qc["config_groups"] and ATTN in qc["ignore"]


def test_invalid_regex_refused(src, tmp_path):
    with pytest.raises(ConfigError, match="invalid regex"):
        _quantize(src, tmp_path / "q", ["scheme=w8a8", "quantize.targets=['(']"])
