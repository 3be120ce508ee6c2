"""Metadata declared per format, detection by flags, optional parameters and the output signature."""

import json

import pytest
from omegaconf import OmegaConf

from quantfw.api import components
from quantfw.config.compose import compose
from quantfw.errors import ConfigError
from quantfw.eval.checkpoint import evaluate_checkpoint
from quantfw.formats.format import Format
from quantfw.integrations.hf import save_tiny_checkpoint
from quantfw.io import metadata
from quantfw.io.loader import open_checkpoint
from quantfw.quantize.checkpoint import quantize_checkpoint
from quantfw.schemes.scheme import Scheme

CASES = {
    # name: (quantize overrides, detected scheme, detected flags)
    "ct_int4_unclipped": (
        ["scheme=w4a8", "scheme.group_size=0", "format=compressed_tensors"],
        "w4a8",
        {"weight_bits": 4, "group_size": 0, "activation_use_clip": False},
    ),
    "ct_int4_clipped": (
        ["scheme=w4a8_clip", "format=compressed_tensors"],
        "w4a8_clip",
        {"weight_bits": 4, "group_size": 0, "activation_use_clip": True},
    ),
    "ms_int4_clipped": (
        ["scheme=w4a8_clip", "format=msmodelslim"],
        "w4a8_clip",
        {"weight_bits": 4, "group_size": 0, "activation_use_clip": True},
    ),
    "ms_int4_group": (
        ["scheme=w4a8", "scheme.group_size=128", "format=msmodelslim"],
        "w4a8",
        {"weight_bits": 4, "group_size": 128, "activation_use_clip": False},
    ),
    "ms_int8": (["scheme=w8a8", "format=msmodelslim"], "w8a8", {"weight_bits": 8, "group_size": 0}),
}


@pytest.fixture(scope="module")
def floats(tmp_path_factory):
    return save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("float") / "qwen3", seed=5)


@pytest.fixture(scope="module")
def written(floats, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for name, (overrides, _, _) in CASES.items():
        scheme, fmt, _ = components(compose("default", overrides))
        out[name] = quantize_checkpoint(floats, root / name, scheme, fmt, progress=False)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_detection_names_the_scheme_whose_declared_flags_match(name, written):
    _, scheme, flags = CASES[name]
    op = open_checkpoint(written[name])
    assert op.scheme.name == scheme
    assert {k: op.scheme.flags[k] for k in flags} == flags


def test_an_unclipped_4bit_compressed_tensors_file_is_not_named_clipped(written):
    qc = json.loads((written["ct_int4_unclipped"] / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_1"]["activation_use_clip"] is False
    op = open_checkpoint(written["ct_int4_unclipped"])
    assert op.scheme.name != "w4a8_clip" and not op.scheme.clips


def test_eval_reports_a_clip_checkpoints_scheme_and_its_alphas(written, floats):
    rows = evaluate_checkpoint(written["ms_int4_clipped"], floats, tokens=32, progress=False)
    assert {r["scheme"] for r in rows} == {"w4a8_clip"}
    assert all(len(r["alphas"]) == 8 and all(a == 1.0 for a in r["alphas"]) for r in rows)
    unclipped = evaluate_checkpoint(written["ms_int4_group"], floats, tokens=32, progress=False)
    assert {r["scheme"] for r in unclipped} == {"w4a8"} and not any("alphas" in r for r in unclipped)


def test_each_format_declares_a_registered_metadata_style_and_its_files():
    for name in ("msmodelslim", "compressed_tensors", "pack_quantized"):
        fmt = Format.from_config(
            compose("default", ["scheme=w4a8", "scheme.group_size=0", f"format={name}"]).format
        )
        style = metadata.styles().get(fmt.metadata)
        assert fmt.metadata_decl["style"] == fmt.metadata and style.files(fmt.metadata_decl)
    assert metadata.STYLES.group == "quantfw.metadata_styles"
    assert {"msmodelslim", "compressed_tensors"} <= set(metadata.styles().names())


def test_an_unknown_metadata_style_is_refused_naming_the_registered_ones():
    cfg = OmegaConf.to_container(compose("default", ["format=msmodelslim"]).format)
    cfg["metadata"] = {**cfg["metadata"], "style": "nosuch"}
    with pytest.raises(
        ConfigError, match=r"unknown metadata style 'nosuch' \(available: compressed_tensors, msmodelslim"
    ):
        Format.from_config(cfg)


def test_a_style_registered_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        metadata.styles().add("msmodelslim", metadata.MetadataStyle())


def _scheme(overrides):
    return Scheme.from_config(compose("default", overrides).scheme)


def test_signature_covers_the_used_observer_parameters_only():
    mse = ["scheme=w4a8", "scheme.weight_observer=mse"]
    base = _scheme(mse).signature()
    assert _scheme([*mse, "scheme.gptq_damp=0.05"]).signature() == base  # gptq not used
    assert _scheme([*mse, "scheme.ssz_iters=3"]).signature() == base
    assert _scheme([*mse, "scheme.missing_alpha=ones"]).signature() == base  # a load option
    assert _scheme([*mse, "scheme.observer_grid=7"]).signature() != base  # mse reads it
    gptq = ["scheme=w4a8", "scheme.weight_observer=gptq"]
    g = _scheme(gptq).signature()
    assert _scheme([*gptq, "scheme.gptq_damp=0.05"]).signature() != g
    # gptq's scale observer (mse) and its fallback's parameters are in effect too
    assert _scheme([*gptq, "scheme.observer_grid=7"]).signature() != g
    assert _scheme([*gptq, "scheme.ssz_iters=3"]).signature() == g
    assert _scheme([*gptq, "scheme.group_size=128"]).signature() != g  # a layout flag


def test_clipping_is_read_from_the_optional_parameter_declaration():
    clip, plain = _scheme(["scheme=w4a8_clip"]), _scheme(["scheme=w4a8"])
    assert clip.clips and not plain.clips
    (p,) = clip.optional_in_use().values()
    assert (p.roles, p.init) == (("w2",), "ones") and clip.flags[p.flag] is True
    assert plain.flags[p.flag] is False and not _scheme(["scheme=w8a8"]).optional_in_use()


def test_weight_bits_is_bounded_by_the_integer_widths_not_a_list():
    cfg = OmegaConf.to_container(compose("default", ["scheme=w8a8"]).scheme)
    assert Scheme.from_config({**cfg, "weight_bits": 6}).flags["weight_bits"] == 6
    for bad in (1, 9, True):
        with pytest.raises(ConfigError, match=r"weight_bits=\S+ \(allowed: 2 to 8\)"):
            Scheme.from_config({**cfg, "weight_bits": bad})


@pytest.mark.parametrize("fmt", ["msmodelslim", "compressed_tensors"])
def test_a_format_refuses_weight_bits_its_layout_cannot_store(fmt):
    with pytest.raises(
        ConfigError, match=r"weight_bits=6 \(allowed: 4, 8\) is what its metadata.weight_bits says"
    ):
        compose("default", ["scheme=w8a8", "scheme.weight_bits=6", f"format={fmt}"])
