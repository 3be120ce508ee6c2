"""`quantfw eval`: per-expert metrics, perplexity with swapped layers, JSON schema, multirun table."""

import json

import pytest
import torch
from checkpoint_helpers import cli

from quantfw.api import components
from quantfw.calibrate.result import CalibrationResult
from quantfw.config.compose import compose
from quantfw.eval import report
from quantfw.eval.checkpoint import checkpoint_perplexity, evaluate_checkpoint
from quantfw.eval.metrics import compare
from quantfw.eval.perplexity import perplexity_details
from quantfw.eval.synthetic import hidden_states, random_routing
from quantfw.integrations.hf import save_tiny_checkpoint
from quantfw.io.experts import MoEModel, read_float_experts
from quantfw.io.loader import from_checkpoint
from quantfw.io.reader import CheckpointReader
from quantfw.moe.reference import FloatMoE
from quantfw.quantize.checkpoint import quantize_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    src = save_tiny_checkpoint("qwen3_moe", root / "float", seed=4)
    out = {"float": src}
    for name, ov in {
        "w8a8": ["scheme=w8a8", "format=msmodelslim"],
        "clip": ["scheme=w4a8_clip", "format=compressed_tensors"],
    }.items():
        s, f, _ = components(compose("default", ov))
        alphas = {L: torch.linspace(0.6, 0.95, 8) for L in (0, 1)} if name == "clip" else {}
        result = CalibrationResult(alphas)
        out[name] = quantize_checkpoint(src, root / name, s, f, progress=False, calibration=result)
    return out


def test_per_expert_rows_are_that_expert_alone_on_its_tokens(ckpts):
    T = 96
    rows = evaluate_checkpoint(ckpts["clip"], ckpts["float"], T, seed=0, per_expert=True)
    assert [r["layer"] for r in rows] == [0, 1]
    r = CheckpointReader(ckpts["float"])
    w13, w2 = read_float_experts(r, MoEModel.from_config(r.config(), "config.json"), 1)
    quant = from_checkpoint(ckpts["clip"], layer=1)
    x = hidden_states(T, 512, seed=1)
    _, ids = random_routing(T, 8, 2, seed=2)  # what evaluate_checkpoint uses for seed=0
    experts = rows[1]["experts"]
    assert sum(e["tokens"] for e in experts) == T * 2
    assert [e["alpha"] for e in experts] == pytest.approx(torch.linspace(0.6, 0.95, 8).tolist())
    for e in (0, 5):
        tok = (ids == e).any(-1)
        one, ide = torch.ones(int(tok.sum()), 1), torch.full((int(tok.sum()), 1), e)
        m = compare(quant(x[tok], one, ide), FloatMoE(w13, w2)(x[tok], one, ide))
        assert experts[e]["rel_l2"] == pytest.approx(m["rel_l2"], rel=1e-9)
        assert experts[e]["max_abs"] == pytest.approx(m["max_abs"], rel=1e-9)
    assert 0 < experts[0]["rel_l2"] < 1 and experts[0]["cosine"] > 0.9


def test_perplexity_float_and_swapped_quantized(ckpts):
    from quantfw.calibrate.model import calibration_tokens, load_float_model

    p8 = checkpoint_perplexity(ckpts["w8a8"], ckpts["float"], tokens=256, seq_len=128)
    model = load_float_model(ckpts["float"])
    ids, _ = calibration_tokens(ckpts["float"], model.config.vocab_size, 256, 0, split="heldout")
    assert p8["float"] == pytest.approx(perplexity_details(model, ids, seq_len=128).perplexity, rel=1e-6)
    assert p8["token_source"] == "pseudo_random" and p8["predicted_tokens"] == 2 * 127
    assert p8["quantized"] != p8["float"] and abs(p8["delta"]) < 0.01  # W8A8: close, not equal
    lo, hi = p8["delta_ci95"]
    assert p8["windows"] == 2 and lo < p8["delta"] < hi
    pc = checkpoint_perplexity(ckpts["clip"], ckpts["float"], tokens=256, seq_len=128)
    assert pc["float"] == p8["float"] and pc["quantized"] != p8["quantized"]


def test_schema_problems_catch_departures(ckpts):
    rows = evaluate_checkpoint(ckpts["w8a8"], ckpts["float"], 32, per_expert=True)
    doc = {
        "schema": report.SCHEMA, "checkpoint": "c", "reference": "r", "recipe_overrides": [],
        "tokens": 32, "seed": 0, "layers": rows, "perplexity": None, "alpha_calibration": None,
    }  # fmt: skip
    doc["runs"] = [report.summary_row(doc)]
    assert report.schema_problems(json.loads(json.dumps(doc))) == []
    bad = json.loads(json.dumps(doc))
    del bad["layers"][0]["experts"][2]["rel_l2"]
    bad["layers"][1]["cosine"] = "0.9"
    bad["runs"][0]["rel_l2_mean"] = None
    bad["schema"] = "other/2"
    problems = report.schema_problems(bad)
    assert any("$.layers[0].experts[2].rel_l2: missing" in p for p in problems)
    assert any("$.layers[1].cosine" in p for p in problems)
    assert any("$.runs[0].rel_l2_mean" in p for p in problems)
    assert any("$.schema" in p for p in problems) and len(problems) == 4


def test_cli_multirun_table_json_plot(ckpts, tmp_path):
    js, md, png = tmp_path / "ev.json", tmp_path / "t.md", tmp_path / "p.png"
    r = cli(
        "eval", "--multirun", f"checkpoint={ckpts['w8a8']},{ckpts['clip']}", f"reference={ckpts['float']}",
        "tokens=64", f"out={js}", f"eval.table={md}", f"eval.plot={png}",
        "eval.perplexity=true", "eval.ppl_tokens=256", "eval.seq_len=128",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(js.read_text())
    assert report.schema_problems(doc) == []
    assert doc["checkpoint"] == str(ckpts["clip"])  # the last job's details
    assert [row["scheme"] for row in doc["runs"]] == ["w8a8", "w4a8_clip"]
    assert doc["runs"][1]["alpha"] == "learned 0.600-0.950" and doc["runs"][0]["alpha"] == "-"
    assert all(row["ppl_float"] == doc["runs"][0]["ppl_float"] for row in doc["runs"])
    lines = md.read_text().splitlines()
    assert len(lines) == 4 and "| w8a8 |" in lines[2] and "| w4a8_clip |" in lines[3]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
