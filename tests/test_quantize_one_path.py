"""One quantize path: the in-memory `quantize_experts` and the checkpoint converter quantize through
the same ExpertQuantizer, so with the same calibration inputs they give the same tensors, and
their records share one schema (ExpertRecord) and one serialization."""

import json

import pytest
import torch
from checkpoint_helpers import float_experts
from omegaconf import OmegaConf

from quantfw.api import components
from quantfw.calibrate.model import calibrate_checkpoint, needs_calibration
from quantfw.calibrate.result import CalibrationResult
from quantfw.config.compose import compose
from quantfw.integrations.hf import save_tiny_checkpoint
from quantfw.io.loader import layer_tensors, open_checkpoint
from quantfw.io.metadata import quantfw_block
from quantfw.io.reader import CheckpointReader
from quantfw.quantize.checkpoint import quantize_checkpoint
from quantfw.quantize.experts import RoutedInputs, quantize_experts
from quantfw.quantize.record import FIELDS, ExpertRecord, QuantReport
from quantfw.quantize.weights import quantize_weight

CALIB = OmegaConf.create(
    {"tokens": 256, "seq_len": 32, "batch_size": 4, "min_tokens": 4, "policy": "ones", "max_rows": 1024}
)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("float") / "qwen3", seed=3)


@pytest.mark.parametrize(
    "overrides",
    [
        # data-free: the in-memory path quantizes the expert stack at once, the converter per expert
        ["scheme=w4a8", "scheme.group_size=0", "format=msmodelslim"],
        ["scheme=w4a8_clip", "format=compressed_tensors"],
        # data-driven, learned clip ratios per channel: one expert at a time on both paths
        [
            "scheme=w4a8",
            "scheme.group_size=0",
            "format=msmodelslim",
            "scheme.weight_observer=learned_clip",
            "scheme.observer_min_tokens=64",
        ],
    ],
)
def test_in_memory_tensors_equal_the_converters(src, tmp_path, overrides):
    scheme, fmt, _ = components(compose("default", overrides))
    result = calibrate_checkpoint(src, scheme, CALIB, 0) if needs_calibration(scheme) else None
    out = quantize_checkpoint(src, tmp_path / "q", scheme, fmt, progress=False, calibration=result)
    op = open_checkpoint(out, "default", overrides)
    reader = CheckpointReader(src)
    report = QuantReport()
    for layer in op.prefixes:
        w13, w2 = float_experts(reader, layer)
        alpha, inputs = (result.alphas.get(layer), result.inputs[layer]) if result else (None, None)
        mine = quantize_experts(scheme, fmt, w13, w2, alpha, calib=inputs, report=report, log=None, layer=layer)
        written = layer_tensors(op.at(layer), layer)
        assert mine.keys() == written.keys()
        for name, t in mine.items():
            assert t.dtype == written[name].dtype and torch.equal(t, written[name]), (layer, name)
    meta = quantfw_block(out)
    if "weight_observer=learned_clip" not in " ".join(overrides):
        assert report.records == [] and "weight_calibration" not in meta
        return
    # The checkpoint's record counts gate and up apart; in memory they are quantized as w13.
    wc = meta["weight_calibration"]
    by_role = {(r.layer, r.expert, r.role): r for r in report.records}
    assert wc["projections"] == len(report.records) * 3 // 2
    assert wc["data_driven"] == 3 * sum(1 for r in report.records if not r.fallback) // 2
    fell = {(int(L), e) for L, projs in wc["fallback"]["experts"].items() for e in projs.get("down", [])}
    assert fell == {(r.layer, r.expert) for r in report.fallbacks if r.role == "w2"}
    assert fell, "observer_min_tokens=64 leaves some of the 8 experts (2 x 256 routed slots) too few rows"
    for L, projs in wc["clip_ratio_mean"].items():
        for e, mean in projs["down"]:
            assert by_role[int(L), e, "w2"].clip_ratio_mean == mean


def test_record_serializes_the_same_on_both_paths():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 64, generator=g), torch.randn(80, 64, generator=g)
    flags = {"weight_bits": 4, "group_size": 0, "weight_observer": "learned_clip", "observer_grid": 4}
    qw = quantize_weight(w, flags, x)
    rec = ExpertRecord.of(qw, x, 3, 5, "down")
    assert (rec.observer, rec.tokens, rec.fallback, rec.role) == ("learned_clip", 80, None, "w2")
    assert rec.clip_ratio.shape == (32,) and rec.clip_ratio_mean == round(float(rec.clip_ratio.mean()), 6)
    # The resume records hold exactly FIELDS; per-channel ratios stay in memory.
    assert list(rec.to_json()) == list(FIELDS)
    back = ExpertRecord.from_json(json.loads(json.dumps(rec.to_json())))
    assert back == rec and back.clip_ratio is None
    few = ExpertRecord.of(quantize_weight(w, flags, x[:3]), x[:3], 3, 6, "gate")
    assert few.observer == "minmax" and "observer_min_tokens" in few.fallback and few.clip_ratio_mean is None
    report = QuantReport.from_json([few.to_json(), rec.to_json()], "learned_clip")
    assert [r.expert for r in report.fallbacks] == [6]
    assert [r["expert"] for r in report.to_json()] == [5, 6]  # layer, expert, projection order
    meta = report.weight_calibration(flags, {"source": "test"})
    assert (meta["projections"], meta["data_driven"], meta["tokens_used"]) == (2, 1, 80)
    assert meta["fallback"]["experts"] == {"3": {"gate": [6]}} and meta["fallback"]["count"] == 1
    assert meta["clip_ratio_mean"] == {"3": {"down": [[5, rec.clip_ratio_mean]]}}


def test_given_alphas_are_a_calibration_result_without_a_record():
    given = CalibrationResult({0: torch.full((4,), 0.5)})
    assert given.alpha_metadata is None and given.alpha_method == "given"
    learned = CalibrationResult({0: torch.full((4,), 0.5)}, metadata={"method": "grid"})
    assert learned.alpha_metadata == {"method": "grid"} and learned.alpha_method == "grid"
    assert CalibrationResult({}, metadata={"method": "grid"}).alpha_metadata is None


def test_in_memory_records_name_the_layer_and_log_each_expert():
    cfg = compose(
        "default",
        [
            "scheme=w4a8",
            "scheme.group_size=0",
            "scheme.weight_observer=learned_clip",
            "scheme.observer_grid=4",
            "model.hidden_size=256",
            "model.moe_intermediate_size=128",
            "model.num_experts=2",
        ],
    )
    scheme, fmt, _ = components(cfg)
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(2, 256, 256, generator=g) * 0.05, torch.randn(2, 256, 128, generator=g) * 0.05
    x = torch.randn(48, 256, generator=g)
    report, lines = QuantReport(), []
    quantize_experts(
        scheme, fmt, w13, w2, calib=RoutedInputs(x, torch.tensor([[0, 1]]).expand(48, 2), w13),
        report=report, log=lines.append, layer=7,
    )  # fmt: skip
    assert [(r.layer, r.expert, r.proj) for r in report.records] == [
        (7, 0, "w13"), (7, 1, "w13"), (7, 0, "w2"), (7, 1, "w2"),
    ]  # fmt: skip
    assert all(r.tokens == 48 and r.clip_ratio is not None for r in report.records)
    assert len(lines) == 4 and "learned_clip (48 tokens" in lines[0]
