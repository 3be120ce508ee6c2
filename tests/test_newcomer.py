"""A newcomer's first hour (issue 16): comparison rows from their own declarations, plan's two
byte counts and JSON, `quantfw example`, progress off in pipes, eval's table, install metadata."""

import json
from pathlib import Path

import pytest
import tomllib
from safetensors import safe_open

from quantfw.eval.checkpoint import format_rows, worst_experts
from quantfw.eval.comparison import comparison_rows
from quantfw.eval.report import perplexity_line
from quantfw.layout.spec import Dims
from tests.test_cli import ROOT, quantfw

MY_MOE = """name: my_moe
hidden_size: 4096
moe_intermediate_size: 1536
num_experts: 64
top_k: 6
num_layers: 28
first_moe_layer: 1
"""


def _user_recipe(tmp_path: Path) -> Path:
    d = tmp_path / "my_recipes"
    (d / "model").mkdir(parents=True)
    (d / "model" / "my_moe.yaml").write_text(MY_MOE)
    (d / "my_moe_w4a8.yaml").write_text(
        "defaults:\n  - qwen3_30b_a3b_w4a8\n  - override model: my_moe\n  - _self_\nscheme:\n  group_size: 128\n"
    )
    return d


def test_rows_do_not_take_the_recipe_scheme_body(tmp_path):
    d = _user_recipe(tmp_path)
    r = quantfw("plan", "--config-dir", str(d), "recipe=my_moe_w4a8", "out=plan.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "plan.json").read_text())
    labels = [row["label"] for row in doc["memory"]]
    assert labels == ["bf16", "w8a8 per-channel [msmodelslim]", "w4a8 g128 [msmodelslim] (recipe)"]
    # w8a8 at 64 x 4096 x 1536 x 27 layers: int8 weights plus per-channel scales, about half of bf16
    w8 = doc["memory"][1]
    assert w8["disk_bytes"] / doc["memory"][0]["disk_bytes"] == pytest.approx(0.5, abs=0.01)


def test_rows_adapt_group_size_or_skip():
    rows, notes = comparison_rows("demo", Dims(E=4, H=4096, I=1408))
    labels = [r.label for r in rows]
    assert "w4a8 g128 [msmodelslim] (adapted)" in labels  # 256 does not divide 1408, 128 does
    assert any("group_size=256 does not divide w2 K=1408" in n and "group_size=128" in n for n in notes)
    rows, notes = comparison_rows("demo", Dims(E=4, H=4096, I=1400))  # 1400 = 8 * 175: no 32-multiple
    assert not any(r.label.startswith("w4a8 g") for r in rows)
    assert any(n.startswith("skipped w4a8 [msmodelslim]") for n in notes)
    assert len(rows) == 4  # the per-channel rows still apply


def test_plan_bytes_on_disk_and_in_kernel_memory(tmp_path):
    r = quantfw("plan", "recipe=deepseek_v3_w4a8", "out=p.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "p.json").read_text())
    recipe = doc["memory"][-1]
    assert recipe["format"] == "msmodelslim" and "on disk" in r.stdout and "kernel memory" in r.stdout
    # msModelSlim stores offsets and per-group seconds that post-load drops: disk > kernel memory
    assert recipe["disk_bytes"] > recipe["kernel_bytes"]
    # int4 weights dominate: 58 layers x 256 experts x 3 x 7168 x 2048 / 2 bytes
    assert recipe["kernel_bytes"] > 58 * 256 * 3 * 7168 * 2048 // 2
    assert set(doc["flags"]) == {"weight_bits", "group_size", "activation_use_clip"}
    assert "weight_observer" not in r.stdout.split("flags:")[1].splitlines()[0]


def test_plan_out_must_be_json(tmp_path):
    r = quantfw("plan", "out=plan.txt", cwd=tmp_path)
    assert r.returncode == 2 and "plan writes JSON" in r.stderr


@pytest.mark.parametrize(
    "model, dtype, expert_key",
    [
        ("tiny", "bf16", "model.layers.0.mlp.experts.3.gate_proj.weight"),
        ("tiny_mixtral", "bf16", "model.layers.1.block_sparse_moe.experts.7.w2.weight"),
        ("tiny_deepseek_v3", "fp8", "model.layers.1.mlp.experts.0.up_proj.weight"),
    ],
)
def test_example_checkpoint(tmp_path, model, dtype, expert_key):
    pytest.importorskip("transformers")
    out = tmp_path / "float"
    r = quantfw("example", f"out={out}", f"model={model}", f"dtype={dtype}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Writing model shards" not in r.stderr  # no bars into a pipe
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 512 and config["num_experts_per_tok"] == 2
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        t = f.get_tensor(expert_key)
        keys = set(f.keys())
    want = "float8_e4m3fn" if dtype == "fp8" else "bfloat16"
    assert str(t.dtype).endswith(want) and tuple(t.shape) in ((256, 512), (512, 256))
    if dtype == "fp8":
        assert config["quantization_config"]["quant_method"] == "fp8"
        assert expert_key.replace(".weight", ".weight_scale_inv") in keys
    r = quantfw("example", f"out={out}", cwd=tmp_path)  # existing non-empty folder: refused
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not an empty folder" in r.stderr


def test_example_journey_quantize_check_eval(tmp_path):
    pytest.importorskip("transformers")
    assert quantfw("example", "out=float", cwd=tmp_path).returncode == 0
    r = quantfw("quantize", "input=float", "output=q", "scheme=w4a8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr  # progress bars are off when stderr is not a terminal
    r = quantfw("check", "checkpoint=q", "scheme=w4a8", cwd=tmp_path)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    r = quantfw("eval", "checkpoint=q", "reference=float", "scheme=w4a8", "progress=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "worst experts" in r.stdout and r.stdout.count(" e") >= 6  # 3 experts x 2 layers named


def test_worst_experts_and_perplexity_line():
    row = {"experts": [{"expert": i, "rel_l2": v} for i, v in enumerate([0.1, 0.4, None, 0.3, 0.2])]}
    assert worst_experts(row) == "e1 0.400, e3 0.300, e4 0.200"
    table = format_rows(
        [
            {
                "layer": 2,
                "scheme": "w4a8",
                "format": "msmodelslim",
                "rel_l2": 0.2,
                "cosine": 0.98,
                "max_abs": 1.0,
                **row,
            }
        ]
    )
    assert table.splitlines()[1].endswith("e1 0.400, e3 0.300, e4 0.200")
    ppl = {
        "float": 10.0,
        "quantized": 10.5,
        "delta": 0.05,
        "delta_ci95": [0.03, 0.07],
        "windows": 8,
        "predicted_tokens": 1016,
        "token_source": "tokenizer",
    }
    line = perplexity_line(ppl)
    assert "delta +5.00%" in line and "95% interval [+3.00%, +7.00%]" in line
    assert "no interval" in perplexity_line({**ppl, "delta_ci95": None, "windows": 1})


def test_install_metadata_spdx_and_tqdm():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"  # SPDX string: no setuptools deprecation banner
    assert any(d.startswith("tqdm") for d in meta["project"]["dependencies"])
    assert "-rfE" in meta["tool"]["pytest"]["ini_options"]["addopts"]


def test_demo_norm_ratio_links_rel_l2_and_cosine():
    """rel_l2^2 = 1 + s^2 - 2 s cos (s = |out| / |ref|): why a clip can lower rel_l2 and cosine at once."""
    from quantfw.backends import get_backend
    from quantfw.config.compose import compose
    from quantfw.eval.scheme_table import Variant, evaluate_schemes

    dims = Dims(E=4, H=512, I=256)
    rows, _ = comparison_rows("demo", dims)
    variants = [Variant(r.label, r.scheme, r.format, r.learn_alpha) for r in rows[:2]]
    backend = get_backend(compose("default", []).backend)
    for r in evaluate_schemes(variants, backend, dims, 2, 64, calibration_tokens=256, progress=False):
        s = r["norm_ratio"]
        assert r["rel_l2"] ** 2 == pytest.approx(1 + s * s - 2 * s * r["cosine"], rel=1e-3, abs=1e-9)


def test_demo_says_its_size_first(monkeypatch, capsys):
    from quantfw.cli import demo
    from quantfw.config.compose import compose

    monkeypatch.setattr(demo, "ANNOUNCE_BYTES", 3 * 4 * 512 * 256 * 4)  # 4 fp32 experts of 512 x 256
    cfg = compose("default", ["model.num_experts=4", "tokens=32"])
    demo.run(cfg)
    err = capsys.readouterr().err
    assert "quantfw demo: building 4 experts of 512 x 256 (0.0 GB fp32" in err
    assert "\r" not in err  # no bar: stderr is not a terminal here


def test_progress_only_on_a_terminal_and_when_asked(monkeypatch):
    import io
    import sys

    from quantfw import progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert progress.enabled(True) and not progress.enabled(False)
    list(progress.bar(range(3), desc="shards"))
    assert "shards" in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.enabled(True)
