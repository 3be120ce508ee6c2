"""JSON of the wrong type anywhere in a checkpoint (index, config.json, quantization_config,
msModelSlim description) is one line naming the file and the key, never a traceback and never
a silent reinterpretation (`"false"` is not true; a group strategy is not per channel)."""

from __future__ import annotations

import pytest
from hostile_checkpoints import copy, edit_json, index_of, one_line, quantized, refused, run

from quantfw.errors import CheckpointError
from quantfw.io.loader import open_checkpoint

G1 = "quantization_config.config_groups.group_1"
EXPERT_W = "model.layers.0.mlp.experts.0.gate_proj.weight"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    return {s: quantized(root, s) for s in ("clip", "w4a8", "w8a8")}


def _broken(ckpts, tmp_path, scheme, file, fn):
    folder = copy(ckpts[scheme], tmp_path / scheme)
    edit_json(index_of(folder) if file == "INDEX" else folder / file, fn)
    return folder


def _set(path: str, value):
    """An edit setting the dotted path (keys containing dots are written whole as the last part)."""

    def fn(d):
        parts = path.split(".")
        for i, p in enumerate(parts[:-1]):
            if p not in d:
                d[".".join(parts[i:])] = value
                return None
            d = d[p]
        d[parts[-1]] = value

    return fn


def _expect(folder, file: str, key: str, *more: str) -> str:
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    msg = one_line(e)
    assert file in msg and key in msg, msg
    for m in more:
        assert m in msg, msg
    return msg


INDEX_CASES = [
    ("top level array", lambda d: [d], "top level", "JSON object, found array"),
    ("weight_map a list", _set("weight_map", ["a"]), "weight_map", "JSON object, found array"),
    ("weight_map absent", lambda d: {"metadata": {}}, "weight_map", "found nothing"),
    (
        "shard name an int",
        lambda d: d["weight_map"].__setitem__(EXPERT_W, 3),
        f"weight_map.{EXPERT_W}",
        "a string",
    ),
]


@pytest.mark.parametrize("label,fn,key,why", INDEX_CASES, ids=[c[0] for c in INDEX_CASES])
def test_index_of_the_wrong_type(ckpts, tmp_path, label, fn, key, why):
    folder = _broken(ckpts, tmp_path, "clip", "INDEX", fn)
    _expect(folder, index_of(folder).name, key, why)


CONFIG_CASES = [
    ("top level array", lambda d: [d], "top level", "JSON object"),
    ("hidden_size a string", _set("hidden_size", "512"), "hidden_size", "found string '512'"),
    ("num_experts a boolean", _set("num_experts", True), "num_experts", "found boolean true"),
    ("intermediate a float", _set("moe_intermediate_size", 256.0), "moe_intermediate_size", "number 256.0"),
    ("model_type a number", _set("model_type", 5), "model_type", "a string"),
    ("num_hidden_layers a list", _set("num_hidden_layers", [2]), "num_hidden_layers", "found array"),
    ("mlp_only_layers of strings", _set("mlp_only_layers", ["0"]), "mlp_only_layers", "layer indices"),
]


@pytest.mark.parametrize("label,fn,key,why", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_json_of_the_wrong_type(ckpts, tmp_path, label, fn, key, why):
    folder = _broken(ckpts, tmp_path, "w4a8", "config.json", fn)
    if key == "mlp_only_layers":  # read by check (which layers are MoE)
        from quantfw.io.loader import check

        with pytest.raises(CheckpointError) as e:
            check(open_checkpoint(folder))
        assert "config.json" in one_line(e) and key in one_line(e) and why in one_line(e)
        return
    _expect(folder, "config.json", key, why)


QC_CASES = [
    ("quantization_config a list", _set("quantization_config", [1]), "quantization_config", "JSON object"),
    ("config_groups a list", _set("quantization_config.config_groups", []), "config_groups", "JSON object"),
    ("a group a string", _set(f"{G1}", "MoEGMM"), "group_1", "JSON object"),
    ("weights a string", _set(f"{G1}.weights", "int4"), "group_1.weights", "JSON object"),
    ("num_bits a string", _set(f"{G1}.weights.num_bits", "4"), "weights.num_bits", "found string '4'"),
    ("num_bits unsupported", _set(f"{G1}.weights.num_bits", 2), "weights.num_bits", "one of [4, 8]"),
    ("clip flag a string", _set(f"{G1}.activation_use_clip", "false"), "activation_use_clip", "JSON boolean"),
    ("clip flag an int", _set(f"{G1}.activation_use_clip", 1), "activation_use_clip", "JSON boolean"),
    ("targets an int", _set(f"{G1}.targets", 7), "group_1.targets", "array of strings"),
    ("strategy unknown", _set(f"{G1}.weights.strategy", "tensor"), "weights.strategy", "'channel', 'group'"),
    ("symmetric a string", _set(f"{G1}.weights.symmetric", "true"), "weights.symmetric", "JSON boolean"),
    ("quant_method a number", _set("quantization_config.quant_method", 1), "quant_method", "a string"),
    ("activations dynamic a string", _set(f"{G1}.input_activations.dynamic", "yes"), "dynamic", "boolean"),
]


@pytest.mark.parametrize("label,fn,key,why", QC_CASES, ids=[c[0] for c in QC_CASES])
def test_quantization_config_of_the_wrong_type(ckpts, tmp_path, label, fn, key, why):
    folder = _broken(ckpts, tmp_path, "clip", "config.json", fn)
    _expect(folder, "config.json", key, why)


def test_group_strategy_is_refused_not_read_per_channel(ckpts, tmp_path):
    def grouped(d):
        d["quantization_config"]["config_groups"]["group_1"]["weights"].update(
            strategy="group", group_size=128
        )

    folder = _broken(ckpts, tmp_path, "clip", "config.json", grouped)
    _expect(folder, "config.json", f"{G1}.weights.strategy", "per channel")

    # ...and a channel strategy that also names a group size is contradictory
    def both(d):
        d["quantization_config"]["config_groups"]["group_1"]["weights"].update(group_size=128)

    folder = _broken(ckpts, tmp_path / "b", "clip", "config.json", both)
    _expect(folder, "config.json", f"{G1}.weights.group_size", "null with strategy channel")


DESC = "quant_model_description.json"
DESC_CASES = [
    ("top level array", lambda d: [d], "top level", "JSON object"),
    ("expert entry a number", _set(EXPERT_W, 4), EXPERT_W, "type string"),
    ("expert entry unknown", _set(EXPERT_W, "W4A16"), EXPERT_W, "W4A8_DYNAMIC"),
    ("version a number", _set("version", 1), "version", "a string"),
    ("version not packed int4", _set("version", "0.9.0"), "version", "'1.0.0'"),
    ("group_size a string", _set("group_size", "256"), "group_size", "found string '256'"),
    ("group_size disagreeing", _set("group_size", 128), "group_size 128", "disagrees"),
    (
        "mixed expert types",
        _set("model.layers.1.mlp.experts.5.down_proj.weight", "W8A8_DYNAMIC"),
        "experts.5.down_proj.weight",
        "one type for every routed expert",
    ),
    ("quantfw block a string", _set("quantfw", "x"), "quantfw", "JSON object"),
]


@pytest.mark.parametrize("label,fn,key,why", DESC_CASES, ids=[c[0] for c in DESC_CASES])
def test_msmodelslim_description_of_the_wrong_type(ckpts, tmp_path, label, fn, key, why):
    folder = _broken(ckpts, tmp_path, "w4a8", DESC, fn)
    _expect(folder, DESC, key, why)


def test_w8a8_description_and_cli_one_line(ckpts, tmp_path):
    folder = _broken(ckpts, tmp_path, "w8a8", DESC, _set(EXPERT_W, ["W8A8_DYNAMIC"]))
    line = refused(run("check", f"checkpoint={folder}"))
    assert DESC in line and EXPERT_W in line and "type string" in line
    folder = _broken(ckpts, tmp_path / "c", "clip", "config.json", _set(f"{G1}.activation_use_clip", "false"))
    line = refused(run("check", f"checkpoint={folder}"))
    assert "config.json" in line and f"{G1}.activation_use_clip" in line and "JSON boolean" in line
