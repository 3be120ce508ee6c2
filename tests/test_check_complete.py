"""`quantfw check` misses nothing: every inconsistency of a stale index in one report (tensors
listed but absent, missing shards, tensors a shard holds that the index does not list or maps
elsewhere), MoE layers config.json promises but the tensors lack, experts under a second prefix.
The loader refuses the same checkpoints in one line (never a silently dropped tensor)."""

from __future__ import annotations

import json

import pytest
from hostile_checkpoints import (
    copy,
    edit_json,
    edit_tensors,
    index_of,
    one_line,
    quantized,
    refused,
    run,
    split,
)

from quantfw.errors import CheckpointError
from quantfw.io.experts import MoEModel, layer_ranges
from quantfw.io.loader import check, open_checkpoint
from quantfw.io.reader import CheckpointReader

A, B = "part-1.safetensors", "part-2.safetensors"


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return quantized(tmp_path_factory.mktemp("valid"), "w4a8")


@pytest.fixture
def two_shards(valid, tmp_path):
    folder = copy(valid, tmp_path / "ckpt")
    return folder, split(folder)


def test_split_checkpoint_is_valid(two_shards):
    folder, wm = two_shards
    assert set(wm.values()) == {A, B}
    assert check(open_checkpoint(folder, collect=True)) == []


def test_every_stale_index_inconsistency_in_one_report(two_shards):
    folder, wm = two_shards
    in_a = sorted(k for k, s in wm.items() if s == A)
    in_b = sorted(k for k, s in wm.items() if s == B)
    unlisted = in_a[:2]  # present in a shard, absent from the index
    moved = in_b[0]  # present in B, index says A
    ghosts = ["model.layers.0.mlp.experts.0.gate_proj.ghost", "model.ghost.weight"]  # listed, absent

    def stale(d):
        m = d["weight_map"]
        for k in unlisted:
            del m[k]
        m[moved] = A
        m.update(dict.fromkeys(ghosts, A))
        m["model.lost.weight"] = "part-9.safetensors"  # a missing shard

    edit_json(index_of(folder), stale)
    name = index_of(folder).name
    want = [
        f"part-9.safetensors: shard listed in {name} is missing",
        *(f"{A}: tensor '{g}' is listed in {name} but absent from the shard" for g in ghosts),
        f"{A}: tensor '{moved}' is listed in {name} but absent from the shard",
        *(f"{A}: tensor '{k}' is in the shard but absent from {name}" for k in unlisted),
        f"{B}: tensor '{moved}' is in the shard but {name} maps it to {A}",
    ]
    problems = check(open_checkpoint(folder, collect=True))
    assert len(problems) == len(want), problems
    for w in want:
        assert sum(w in p for p in problems) == 1, (w, problems)
    assert "shard listed in" in problems[0]  # the missing shard explains what follows

    r = run("check", f"checkpoint={folder}")
    assert refused(r).endswith(f"{len(want)} problem(s) (listed above)")
    for w in want:
        assert w in r.stdout

    # loading refuses in one line, says how many more, and points at check
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(folder)
    msg = one_line(e)
    assert want[0] in msg and f"and {len(want) - 1} more" in msg and "quantfw check" in msg


def test_tensor_missing_from_the_index_is_never_dropped(two_shards):
    folder, wm = two_shards
    key = "model.layers.1.mlp.experts.7.down_proj.weight_scale"
    edit_json(index_of(folder), lambda d: d["weight_map"].__delitem__(key))
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(folder)
    assert key in one_line(e) and "absent from" in one_line(e)
    collected = CheckpointReader(folder, collect=True)
    assert key in collected and collected.shard_of(key) == wm[key] and len(collected.problems) == 1


def test_both_missing_shards_listed(two_shards):
    folder, _ = two_shards
    (folder / B).unlink()
    edit_json(index_of(folder), lambda d: d["weight_map"].update({"x.weight": "part-3.safetensors"}))
    r = CheckpointReader(folder, collect=True)
    missing = [p for p in r.problems if "is missing" in p]
    assert len(missing) == 2 and B in missing[0] + missing[1] and "part-3" in missing[0] + missing[1]


def test_duplicate_tensor_in_two_shards_without_index(two_shards):
    folder, wm = two_shards
    index_of(folder).unlink()
    key = next(k for k, s in wm.items() if s == A)
    edit_tensors(folder / B, lambda ts: ts.__setitem__(key, ts[next(iter(ts))].clone()))
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(folder)
    assert key in one_line(e) and "is also in" in one_line(e)


def _drop_layer(folder, layer: int):
    prefix = f"model.layers.{layer}.mlp.experts."
    for shard in sorted(folder.glob("*.safetensors")):
        edit_tensors(shard, lambda ts: [ts.pop(k) for k in [k for k in ts if k.startswith(prefix)]])
    edit_json(
        index_of(folder),
        lambda d: d.__setitem__(
            "weight_map", {k: v for k, v in d["weight_map"].items() if not k.startswith(prefix)}
        ),
    )


def test_missing_moe_layer_reported(valid, tmp_path):
    folder = copy(valid, tmp_path / "ckpt")
    _drop_layer(folder, 1)
    problems = check(open_checkpoint(folder, collect=True))
    assert problems == ["layer 1: no routed-expert tensors (config.json makes layers [0, 1] MoE)"]
    r = run("check", f"checkpoint={folder}")
    assert refused(r).endswith("1 problem(s) (listed above)")
    assert "layer 1: no routed-expert tensors" in r.stdout


def test_dense_layer_rules_of_config_json(valid, tmp_path):
    # DeepSeek-style: the first layer dense, so experts found there are reported, and the
    # missing MoE layer 1 too
    folder = copy(valid, tmp_path / "ckpt")
    _drop_layer(folder, 1)
    edit_json(folder / "config.json", lambda d: d.update(model_type="deepseek_v3", first_k_dense_replace=1))
    problems = check(open_checkpoint(folder, collect=True))
    assert problems == [
        "layer 1: no routed-expert tensors (config.json makes layers [1] MoE)",
        "layer 0: has routed-expert tensors but config.json makes layers [1] MoE",
    ]
    edit_json(
        folder / "config.json",
        lambda d: d.update(model_type="qwen3_moe", first_k_dense_replace=0, mlp_only_layers=[1]),
    )
    assert check(open_checkpoint(folder, collect=True)) == []
    # DeepSeek's multi-token-prediction layer after the decoder layers is MoE but optional
    cfg = dict(model_type="deepseek_v3", first_k_dense_replace=0, mlp_only_layers=[])
    edit_json(
        folder / "config.json", lambda d: d.update(cfg, num_hidden_layers=1, num_nextn_predict_layers=1)
    )
    assert check(open_checkpoint(folder, collect=True)) == []
    edit_json(folder / "config.json", lambda d: d.update(num_hidden_layers=2, num_nextn_predict_layers=1))
    assert check(open_checkpoint(folder, collect=True)) == [
        "layer 1: no routed-expert tensors (config.json makes layers [0, 1] (+ optional [2]) MoE)"
    ]


def test_moe_layers_of_released_configs():
    def layers(**config):
        base = {"hidden_size": 7168, "moe_intermediate_size": 2048, "num_experts": 256}
        model = MoEModel.from_config({**base, **config}, "config.json")
        required, optional = model.moe_layers({**base, **config}, "config.json")
        return layer_ranges(required + optional)

    ds = dict(model_type="deepseek_v3", num_hidden_layers=61, first_k_dense_replace=3, moe_layer_freq=1)
    assert layers(**ds, num_nextn_predict_layers=1) == "[3..61]"
    assert layers(model_type="qwen3_moe", num_hidden_layers=48, decoder_sparse_step=1) == "[0..47]"
    assert layers(model_type="qwen2_moe", num_hidden_layers=6, decoder_sparse_step=2) == "[1, 3, 5]"
    assert layers(model_type="mixtral", num_hidden_layers=32, intermediate_size=14336) == "[0..31]"
    assert (
        MoEModel.from_config(
            {
                "model_type": "llama4",
                "hidden_size": 1,
                "moe_intermediate_size": 1,
                "num_experts": 1,
                "num_hidden_layers": 2,
            },
            "c",
        ).moe_layers({}, "c")
        is None
    )


def test_experts_under_a_second_prefix_reported(valid, tmp_path):
    folder = copy(valid, tmp_path / "ckpt")
    src = "model.layers.0.mlp.experts.2.up_proj.weight"
    other = src.replace(".mlp.", ".block_sparse_moe.")
    edit_tensors(next(folder.glob("*.safetensors")), lambda ts: ts.__setitem__(other, ts[src].clone()))
    shard = next(folder.glob("*.safetensors")).name
    edit_json(index_of(folder), lambda d: d["weight_map"].__setitem__(other, shard))
    problems = check(open_checkpoint(folder, collect=True))
    assert len(problems) == 1 and other in problems[0] and "model.layers.0.mlp.experts" in problems[0]
    assert json.loads((folder / "config.json").read_text())["num_experts"] == 8
