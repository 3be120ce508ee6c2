"""Per-layer scheme choices (recipe key `layers`) and engine profiles checked at compose: keys
refused in one line, each layer written with its scheme and read back in both formats, the
cann_recipes engine loading the mixed DeepSeek output, plan's bytes per choice."""

from __future__ import annotations

import json
import re

import pytest
import torch
from checkpoint_helpers import cli
from safetensors import safe_open

from quantfw.config.compose import compose
from quantfw.config.layer_choice import parse_choices, ranges_text
from quantfw.errors import ConfigError
from quantfw.io.loader import load_layer, open_checkpoint
from quantfw.io.reader import CheckpointReader

# ------------------------------------------------------------------ keys checked at compose


def test_parse_ranges_and_text():
    assert parse_choices({"0-2": "w8a8", 61: "w8a8", "5": "w4a8"}) == {0: "w8a8", 1: "w8a8", 2: "w8a8", 61: "w8a8", 5: "w4a8"}
    assert ranges_text([61, 0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8, 61"


@pytest.mark.parametrize(
    "override, message",
    [
        ("layers={0-2:w8a8,2:w8a8}", r"^layers\.2: layer 2 is also chosen by layers\.0-2 \(overlap\)$"),
        ("layers={2-0:w8a8}", r"^layers\.2-0: range 2-0 is empty"),
        ("layers={x1:w8a8}", r"^layers\.x1: expected a layer index or an inclusive range"),
        ("layers={3:w9a9}", r"^layers\.3: unknown scheme 'w9a9' \(available: w4a8, w4a8_clip, w8a8\)$"),
        ("layers=5", r"^layers: expected a mapping"),
    ],
)
def test_bad_layers_are_one_line_at_compose(override, message):
    with pytest.raises(ConfigError, match=message):
        compose("default", [override])


def test_choice_the_format_cannot_hold_names_the_key():
    # w4a8 is group 256 as declared; compressed_tensors stores int4 per channel only
    with pytest.raises(ConfigError, match=r"^layers\.1: format 'compressed_tensors' .* stores int4 per channel only"):
        compose("deepseek_v3_w4a8_clip", ["layers={1:w4a8}"])


def test_bad_layers_on_the_command_line_exit_2_in_one_line():
    r = cli("plan", "layers={0-2:w8a8,1:w4a8}")
    assert r.returncode == 2
    assert r.stderr.strip() == "quantfw plan: error: layers.1: layer 1 is also chosen by layers.0-2 (overlap)"


def _engine_dir(tmp_path, body: str):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "mine.yaml").write_text(body)
    return tmp_path


def test_user_engine_profile_is_checked_at_compose(tmp_path):
    d = _engine_dir(tmp_path, "name: mine\nrules:\n  - {id: a, check: exec, level: refuse, why: w, source: 'o/r:p'}\n")
    with pytest.raises(ConfigError, match=r"^engine mine: rules\[0\]\.check: 'exec' is not a registered check"):
        compose("default", ["engine=mine"], config_dirs=[d])
    r = cli("plan", "--config-dir", str(d), "engine=mine")  # plan never uses a profile: refused anyway
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("quantfw plan: error: engine mine: rules[0].check: 'exec'")


def test_broken_profile_keys_are_checked_at_compose(tmp_path):
    d = _engine_dir(tmp_path, "name: mine\ncolour: red\nrules: []\n")
    with pytest.raises(ConfigError, match=r"^engine mine\.colour: unknown key"):
        compose("default", ["engine=mine"], config_dirs=[d])
    assert compose("default", ["engine=cann_recipes"]).engine.name == "cann_recipes"  # shipped ones pass


# ------------------------------------------------------------------ quantize / load / check / eval

pytest.importorskip("transformers")
from engine_helpers import MTP, deepseek_fp8  # noqa: E402

CHOICE = f"layers={{0:w8a8,{MTP}:w8a8}}"  # the dense layer 0 and the MTP layer W8A8, as msModelSlim's recipe


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers")
    fp8, flt = deepseek_fp8(root)
    return root, fp8, flt


def _quantize(fp8, out, *args):
    r = cli("quantize", f"input={fp8}", f"output={out}", "progress=false", *args)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def mixed(release):
    """The shipped DeepSeek W4A8-clip recipe (cann_recipes engine) with the layers map, plus the
    same release quantized whole as W4A8-clip and as W8A8 (the references of each layer)."""
    root, fp8, _ = release
    outs = {}
    outs["mixed"] = root / "mixed"
    r = _quantize(fp8, outs["mixed"], "recipe=deepseek_v3_w4a8_clip", CHOICE)
    assert "engine cann_recipes: every rule holds" in r.stderr
    for name, scheme in (("w4", "w4a8_clip"), ("w8", "w8a8")):
        outs[name] = root / name
        _quantize(fp8, outs[name], "recipe=deepseek_v3_w4a8_clip", f"scheme={scheme}")
    return outs


def _tensors(folder, layer: int) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys() if f".layers.{layer}.mlp.experts." in k})
    return out


def test_each_layer_is_written_with_its_scheme(mixed):
    for layer, ref in ((1, "w4"), (MTP, "w8")):
        got, want = _tensors(mixed["mixed"], layer), _tensors(mixed[ref], layer)
        assert got.keys() == want.keys() and got
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    qc = CheckpointReader(mixed["mixed"]).config()["quantization_config"]
    groups = qc["config_groups"]
    assert groups["group_1"]["targets"] == ["MoEGMM"] and groups["group_1"]["weights"]["num_bits"] == 4
    assert groups["group_2"]["weights"] == {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False, "strategy": "channel"}
    assert groups["group_2"]["activation_use_clip"] is False
    (target,) = groups["group_2"]["targets"]
    assert re.match(target[3:], f"model.layers.{MTP}.mlp.experts.3.down_proj")
    assert not re.match(target[3:], "model.layers.1.mlp.experts.3.down_proj")
    assert not re.match(target[3:], f"model.layers.{MTP}.mlp.shared_experts.down_proj")
    layers = qc["quantfw"]["layers"]
    assert {k: (v["scheme"], v["applies"]) for k, v in layers.items()} == {
        "0": ("w8a8", "mlp linears"),
        str(MTP): ("w8a8", "routed experts"),
    }


def test_loader_check_and_engine_read_each_layer(mixed):
    op = open_checkpoint(mixed["mixed"])
    assert op.schemes() == {1: "w4a8_clip", MTP: "w8a8"}
    for layer, ref in ((1, "w4"), (MTP, "w8")):
        a, b = load_layer(op, layer), load_layer(open_checkpoint(mixed[ref]), layer)
        x = torch.randn(16, a.dims.H, generator=torch.Generator().manual_seed(0))
        w = torch.full((16, 2), 0.5)
        ids = torch.randint(0, a.dims.E, (16, 2), generator=torch.Generator().manual_seed(1))
        assert torch.equal(a(x, w, ids), b(x, w, ids)), layer
    r = cli("check", f"checkpoint={mixed['mixed']}", "engine=cann_recipes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"per-layer schemes: layers 1: w4a8_clip; layers {MTP}: w8a8" in r.stdout
    assert "engine cann_recipes (tp 1, ep 1): loads it" in r.stdout


def test_engine_faithful_eval_plans_each_layer(mixed, release, tmp_path):
    _, _, flt = release
    out = tmp_path / "eval.json"
    r = cli("eval", f"checkpoint={mixed['mixed']}", f"reference={flt}", "engine=cann_recipes", "tokens=32", f"out={out}", "progress=false")
    assert r.returncode == 0, r.stderr
    rows = {row["layer"]: row for row in json.loads(out.read_text())["layers"]}
    assert rows[1]["scheme"] == "w4a8_clip" and rows[MTP]["scheme"] == "w8a8"
    # each layer's error equals the error of the checkpoint quantized whole with that layer's scheme
    for layer, ref in ((1, "w4"), (MTP, "w8")):
        ref_out = tmp_path / f"{ref}.json"
        r = cli("eval", f"checkpoint={mixed[ref]}", f"reference={flt}", "engine=cann_recipes", "tokens=32", f"out={ref_out}", "progress=false")
        assert r.returncode == 0, r.stderr
        want = {row["layer"]: row for row in json.loads(ref_out.read_text())["layers"]}[layer]
        assert rows[layer]["rel_l2"] == want["rel_l2"] and rows[layer]["cosine"] == want["cosine"]


def test_dense_layer_choice_writes_its_mlp_w8a8(release, tmp_path):
    _, fp8, _ = release
    out = tmp_path / "dense"
    _quantize(fp8, out, "scheme=w4a8", "format=msmodelslim", "layers={0:w8a8}")  # no engine, no targets
    desc = json.loads((out / "quant_model_description.json").read_text())
    for p in ("gate_proj", "up_proj", "down_proj"):
        assert desc[f"model.layers.0.mlp.{p}.weight"] == "W8A8_DYNAMIC"
        assert desc[f"model.layers.1.mlp.shared_experts.{p}.weight"] == "FLOAT"  # not chosen
    assert desc["model.layers.0.self_attn.o_proj.weight"] == "FLOAT"
    assert desc["model.layers.1.mlp.experts.0.gate_proj.weight"] == "W4A8_DYNAMIC"


def test_msmodelslim_per_tensor_types_read_back(release, tmp_path):
    _, fp8, _ = release
    out = tmp_path / "msm"
    _quantize(fp8, out, "scheme=w4a8", "format=msmodelslim", f"layers={{{MTP}:w8a8}}")
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc[f"model.layers.{MTP}.mlp.experts.0.down_proj.weight"] == "W8A8_DYNAMIC"
    assert desc["model.layers.1.mlp.experts.0.down_proj.weight"] == "W4A8_DYNAMIC"
    op = open_checkpoint(out)
    assert op.schemes() == {1: "w4a8", MTP: "w8a8"}
    r = cli("check", f"checkpoint={out}")
    assert r.returncode == 0 and "OK: every routed-expert tensor" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize(
    "choice, message",
    [
        ("layers={0:w4a8_clip}", r"layer 0 has no routed experts; its MLP linears are written W8A8 only"),
        ("layers={7:w8a8}", r"has no layer 7 \(its layers: 0-2\)"),
    ],
)
def test_choices_the_checkpoint_cannot_take_are_one_line(release, tmp_path, choice, message):
    _, fp8, _ = release
    r = cli("quantize", f"input={fp8}", f"output={tmp_path / 'x'}", "scheme=w4a8_clip", "format=compressed_tensors", choice)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert re.search(message, r.stderr.strip().splitlines()[-1])


# ------------------------------------------------------------------ plan


def test_plan_shows_each_choice_with_its_bytes(mixed, tmp_path):
    out = tmp_path / "plan.json"
    r = cli("plan", "recipe=deepseek_v3_w4a8_clip", "model=tiny_deepseek_v3", "layers={0:w8a8,1:w8a8}", f"out={out}")
    assert r.returncode == 0, r.stderr
    assert "per-layer scheme choices (layers)" in r.stdout
    assert "note: layers 0: dense (no routed experts): MLP linears written W8A8" in r.stdout
    rows = json.loads(out.read_text())["layers"]
    chosen = next(row for row in rows if row["scheme"] == "w8a8" and row["layers"] == "0-1")
    # the on-disk bytes of one W8A8 MoE layer are what the written checkpoint holds for a W8A8 layer
    written = sum(t.numel() * t.element_size() for t in _tensors(mixed["mixed"], MTP).values())
    assert chosen["moe_layers"] == 1 and chosen["layer_disk_bytes"] == written
    recipe = next(row for row in rows if row.get("scheme") == "w4a8_clip")
    written4 = sum(t.numel() * t.element_size() for t in _tensors(mixed["mixed"], 1).values())
    # conf/model/tiny_deepseek_v3: MoE layers 1-2; layer 2 keeps the recipe's scheme
    assert recipe["layer_disk_bytes"] == written4 and recipe["moe_layers"] == 1
    assert rows[-1]["disk_bytes"] == written + written4
