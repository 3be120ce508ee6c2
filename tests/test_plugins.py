"""A third party extends quantfw without editing it: an installed plugin package (found through
entry points) adds an observer, a backend and a checkpoint format (a conf folder of the package,
entry-point group quantfw.conf); a user recipe folder (YAML only) adds a scheme variant, the
backend's declaration and a recipe using all four. Each shows up in plan, demo, bench, quantize
and check (subprocess CLI runs; check detects the plugin's format from the metadata it declares),
and the same commands without the plugin on the path refuse the unknown names in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hostile import write_folder

from quantfw.integrations.hf import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = {
    "qfw_testplugin/__init__.py": "",
    "qfw_testplugin/observer.py": """
        import os

        from quantfw.quantize.observers import get_observer, register_observer


        @register_observer("logged_minmax")
        def logged_minmax(w, flags, x=None):
            \"\"\"min-max, logging each call (a plugin observer).\"\"\"
            with open(os.environ["QFW_PLUGIN_LOG"], "a") as f:
                f.write(f"observer {list(w.shape)}\\n")
            return get_observer("minmax").fn(w, flags, x)
    """,
    "qfw_testplugin/backend.py": """
        import os

        from quantfw.backends import Backend, register_backend
        from quantfw.schemes.plan_ops import PLAN_OPS


        def _log(text):
            with open(os.environ["QFW_PLUGIN_LOG"], "a") as f:
                f.write(text + "\\n")


        def _logged(name, fn):
            def op(*args, **kwargs):
                _log(f"op {name}")
                return fn(*args, **kwargs)

            return op


        @register_backend("counting")
        def make_counting_backend(cfg):
            _log(f"backend {cfg['name']} {cfg['mode']}")
            return Backend(name="counting", ops={n: _logged(n, PLAN_OPS.get(n)) for n in PLAN_OPS})
    """,
    "qfw_testplugin/conf/__init__.py": "",
    # A checkpoint format (from the package's conf folder): msModelSlim's per-group int4 tensors
    # without the all-zero offsets, described in a file of its own so detection can tell it.
    "qfw_testplugin/conf/format/slim_no_offsets.yaml": """
        name: slim_no_offsets
        metadata:
          style: msmodelslim
          files: [quant_model_description_no_offsets.json]
          shard_base: quant_model_weight_w8a8_dynamic
          weight_bits: [8, 4]
        doc: msModelSlim per-group W4A8 without the zero offsets
        requires:
          - {check: "weight_bits == 4 and group_size", message: "stores per-group int4 only"}
        tensors:
          weight: {shape: [N/2, K], dtype: int8, encode: q, shard: {w13: rows, w2: cols}}
          weight_scale: {shape: [N, 1], dtype: float32, encode: s1, shard: {w13: rows, w2: replicate}}
          weight_scale_second: {shape: [N, K/group_size], dtype: float32, encode: s2, shard: {w13: rows, w2: cols}}
          scale_bias: {shape: {w13: [N, 1], w2: [N, 16/tp]}, dtype: float32, encode: scale_bias, shard: {w13: rows, w2: cols}}
        load:
          - {op: transpose, params: weight, dims: [1, 2]}
          - {op: view_int32, params: weight}
          - {op: fuse_scales_fp16, params: [weight_scale, weight_scale_second], out: scale}
          - {op: encode_u64, params: scale}
          - {op: sum_last, params: scale_bias, out: bias}
    """,
    "qfw_testplugin-0.1.dist-info/METADATA": """
        Metadata-Version: 2.1
        Name: qfw-testplugin
        Version: 0.1
    """,
    "qfw_testplugin-0.1.dist-info/entry_points.txt": """
        [quantfw.observers]
        logged_minmax = qfw_testplugin.observer

        [quantfw.backends]
        counting = qfw_testplugin.backend

        [quantfw.conf]
        qfw_testplugin = qfw_testplugin.conf
    """,
}

USER = {
    # A scheme variant: an override of the shipped w4a8, with the plugin's observer.
    "scheme/w4a8_g64_logged.yaml": """
        defaults:
          - w4a8
          - _self_
        name: w4a8_g64_logged
        group_size: 64
        weight_observer: logged_minmax
    """,
    # The plugin backend's declaration (a user file, so that without the plugin the name reaches
    # the backend registry and is refused there).
    "backend/counting.yaml": """
        name: counting
        mode: exact
        post_load: []
        doc: the reference ops, each call logged (the plugin's backend)
    """,
    # The user's own variant lists (replacing conf/compare/rows.yaml): one cheap demo row.
    "compare/rows.yaml": """
        demo:
          - {scheme: w4a8_g64_logged, format: slim_no_offsets, note: user row}
        plan:
          - {scheme: w8a8, format: msmodelslim}
        bench:
          user_pc: {label: w4a8 per-channel (user), scheme: w4a8, format: msmodelslim, flags: {group_size: 0}}
    """,
    "plugged.yaml": """
        defaults:
          - quantfw
          - override scheme: w4a8_g64_logged
          - override format: slim_no_offsets
          - override backend: counting
          - _self_
    """,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plugins")
    plugin = write_folder(tmp / "site", PLUGIN)
    user = write_folder(tmp / "user", USER)
    float_ckpt = save_tiny_checkpoint("mixtral", tmp / "float")
    return tmp, plugin, user, float_ckpt


def _run(
    setup, *args: str, plugin: bool = True, sites: tuple[Path, ...] = ()
) -> tuple[subprocess.CompletedProcess, list[str]]:
    tmp, site, user, _ = setup
    log = tmp / "plugin.log"
    log.write_text("")
    path = [str(ROOT), *([str(site)] if plugin else []), *map(str, sites)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "QFW_PLUGIN_LOG": str(log)}
    r = subprocess.run(
        [sys.executable, "-m", "quantfw.cli.main", *args, "--config-dir", str(user), "recipe=plugged"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return r, log.read_text().splitlines()


def _ops(log: list[str]) -> set[str]:
    return {line.split()[1] for line in log if line.startswith("op ")}


def test_plan_shows_the_plugin_backend_and_the_user_scheme_and_format(setup, tmp_path):
    r, log = _run(setup, "plan", f"out={tmp_path / 'plan.json'}")
    assert r.returncode == 0, r.stderr
    assert "scheme=w4a8_g64_logged format=slim_no_offsets backend=counting" in r.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert (plan["scheme"], plan["format"], plan["flags"]["group_size"]) == (
        "w4a8_g64_logged",
        "slim_no_offsets",
        64,
    )
    assert "w13_weight_offset" not in r.stdout and "w13_weight_scale_second" in r.stdout
    assert "backend counting exact" in log


def test_demo_runs_the_plugin_observer_and_backend_and_the_user_rows(setup):
    r, log = _run(setup, "demo", "tokens=16", "progress=false")
    assert r.returncode == 0, r.stderr
    assert "recipe: w4a8_g64_logged g64 [slim_no_offsets]" in r.stdout and "backend=counting" in r.stdout
    assert "w4a8_g64_logged g64 [slim_no_offsets] user row" in r.stdout and "w8a8" not in r.stdout
    assert any(line.startswith("observer") for line in log)
    assert {"dynamic_quant", "grouped_matmul_a8w4", "swiglu"} <= _ops(log)


def test_bench_times_the_recipe_and_user_rows_on_the_plugin_backend(setup, tmp_path):
    out = tmp_path / "bench.json"
    r, log = _run(
        setup,
        "bench",
        "bench.layers=[model]",
        "bench.schemes=[recipe,user_pc]",
        "bench.tokens=[4]",
        "bench.repeats=1",
        "bench.max_seconds=0.01",
        "bench.copy_mb=8",
        "bench.load=false",
        f"out={out}",
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["backend"] == "counting"
    quant = [x for x in data["records"] if x["mode"] != "float"]
    assert [(x["scheme"], x["mode"]) for x in quant] == [
        ("w4a8_g64_logged [slim_no_offsets] (recipe)", "exact"),
        ("w4a8 per-channel (user)", "exact"),
    ]
    assert "grouped_matmul_a8w4" in _ops(log) and any(line.startswith("observer") for line in log)


def test_quantize_and_check_with_the_plugin_observer_and_user_format(setup, tmp_path):
    float_ckpt = setup[3]
    qdir = tmp_path / "quantized"
    r, log = _run(setup, "quantize", f"input={float_ckpt}", f"output={qdir}", "progress=false")
    assert r.returncode == 0, r.stderr
    # every routed expert projection went through the plugin observer: 8 experts x 2 layers x 3
    assert sum(line.startswith("observer") for line in log) >= 8 * 2
    names = _safetensors_keys(qdir)
    assert any(".experts.0." in k and k.endswith("weight_scale_second") for k in names)
    assert not any(".experts." in k and "weight_offset" in k for k in names)

    # The plugin format's own metadata file was written (and no shipped format's).
    assert (qdir / "quant_model_description_no_offsets.json").is_file()
    assert not (qdir / "quant_model_description.json").exists()

    # Detection names the shipped scheme and format whose metadata style matches; the user's
    # overrides come after it.
    r, _ = _run(setup, "check", f"checkpoint={qdir}", "scheme=w4a8_g64_logged", "format=slim_no_offsets")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "scheme w4a8_g64_logged" in r.stdout and "format slim_no_offsets" in r.stdout
    assert "OK: every routed-expert tensor matches the declared layout" in r.stdout

    # With no override, detection reads the plugin format's declaration: its metadata file names
    # the format, and the scheme is the declared one whose flags match (w4a8 at group 64).
    r, _ = _run(setup, "check", f"checkpoint={qdir}")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "format slim_no_offsets" in r.stdout and "scheme w4a8 " in r.stdout
    assert "'group_size': 64" in r.stdout
    assert "OK: every routed-expert tensor matches the declared layout" in r.stdout

    # Without the plugin, no declared format writes that file: one line listing the expected ones.
    shipped = ["format=msmodelslim", "scheme.weight_observer=minmax", "backend=torch"]
    r, _ = _run(setup, "check", f"checkpoint={qdir}", *shipped, plugin=False)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "no quantization metadata" in err[0], err
    assert "quant_model_description_no_offsets.json" not in err[0]


def _safetensors_keys(folder: Path) -> list[str]:
    from quantfw.io.reader import CheckpointReader

    return list(CheckpointReader(folder).keys())


def test_without_the_plugin_its_format_is_unknown_in_one_line(setup):
    r, _ = _run(setup, "plan", plugin=False)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "format/slim_no_offsets" in err[0], err
    assert "available format: " in err[0] and "msmodelslim" in err[0]


def test_a_plugin_option_that_quantfw_declares_is_refused_in_one_line(setup, tmp_path):
    clash = write_folder(
        tmp_path / "site",
        {
            "qfw_clash/__init__.py": "",
            "qfw_clash/format/msmodelslim.yaml": "name: msmodelslim\n",
            "qfw_clash-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: qfw-clash\nVersion: 0.1\n",
            "qfw_clash-0.1.dist-info/entry_points.txt": "[quantfw.conf]\nclash = qfw_clash\n",
        },
    )
    r, _ = _run(setup, "plan", sites=(clash,))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "plugin 'clash'" in err[0], err
    assert "format/msmodelslim" in err[0] and "already declared by quantfw" in err[0]


@pytest.mark.parametrize("command", ["plan", "demo"])
def test_without_the_plugin_the_observer_is_refused_in_one_line(setup, command):
    # a shipped format: the plugin's is refused first otherwise (test above)
    r, _ = _run(setup, command, "tokens=16", "format=msmodelslim", plugin=False)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "weight_observer='logged_minmax' is unknown" in err[0], err


def test_without_the_plugin_the_backend_is_refused_in_one_line(setup):
    r, _ = _run(setup, "plan", "scheme.weight_observer=minmax", "format=msmodelslim", plugin=False)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "unknown backend 'counting'" in err[0], err
