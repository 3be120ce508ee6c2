"""The safetensors folder reader: shard discovery, lazy reads, U64, and one-line errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from quantfw.errors import CheckpointError
from quantfw.io.reader import CheckpointReader


def _write(folder, shards: dict[str, dict[str, torch.Tensor]], index: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    wm = {}
    for name, ts in shards.items():
        save_file(ts, str(folder / name))
        wm.update(dict.fromkeys(ts, name))
    if index:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return folder


def test_reads_through_index_lazily_and_maps_u64(tmp_path):
    words = torch.tensor([0x3F800000, 0x40000000], dtype=torch.int64)
    d = _write(
        tmp_path / "c",
        {
            "model-00001-of-00002.safetensors": {"a": torch.arange(6.0).reshape(2, 3)},
            "model-00002-of-00002.safetensors": {"s": words.view(torch.uint64)},
        },
    )
    r = CheckpointReader(d)
    assert sorted(r.keys()) == ["a", "s"]
    assert r.info("a").shape == (2, 3) and r.info("a").dtype == torch.float32
    assert r.info("s").dtype == torch.int64 and r.shard_of("s") == "model-00002-of-00002.safetensors"
    s = r.get("s")
    assert s.dtype == torch.int64 and s.tolist() == [0x3F800000, 0x40000000]
    assert torch.equal(r.get("a"), torch.arange(6.0).reshape(2, 3))


def test_msmodelslim_index_name_and_no_index(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"x": torch.ones(2)}, str(d / "quant_model_weight_w8a8_dynamic-00001-of-00001.safetensors"))
    (d / "quant_model_weight_w8a8_dynamic.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "quant_model_weight_w8a8_dynamic-00001-of-00001.safetensors"}})
    )
    assert CheckpointReader(d).keys() == ["x"]
    d2 = _write(
        tmp_path / "n",
        {"a.safetensors": {"x": torch.ones(1)}, "b.safetensors": {"y": torch.ones(1)}},
        index=False,
    )
    assert sorted(CheckpointReader(d2).keys()) == ["x", "y"]


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_dir(tmp_path):
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(tmp_path / "absent")
    assert "absent" in _one_line(e) and "does not exist" in _one_line(e)


def test_truncated_and_garbage_files(tmp_path):
    d = _write(tmp_path / "t", {"model.safetensors": {"w": torch.randn(64, 64)}}, index=False)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(d)
    assert "model.safetensors" in _one_line(e) and "corrupt or truncated" in _one_line(e)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        CheckpointReader(d)


def test_missing_shard_and_absent_tensor(tmp_path):
    d = _write(tmp_path / "s", {"model-00001-of-00002.safetensors": {"a": torch.ones(1)}})
    idx = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(d)
    assert "model-00002-of-00002.safetensors" in _one_line(e) and "missing" in _one_line(e)
    idx["weight_map"]["b"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(d)
    assert "'b'" in _one_line(e) and "absent from the shard" in _one_line(e)
