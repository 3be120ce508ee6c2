"""No pickle, ever: nothing in quantfw unpickles, transformers model loads are pinned to
safetensors, and a malicious `pytorch_model.bin` next to the safetensors is never opened."""

import ast
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import ROOT, cli, quantize

from quantfw.errors import CheckpointError
from quantfw.integrations.hf import save_tiny_checkpoint

PACKAGE = ROOT / "quantfw"


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = ast.unparse(f.value) if isinstance(f, ast.Attribute) else ""
            yield node, name, owner


def _keyword(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text())


def test_no_pickle_module_and_every_torch_load_is_weights_only():
    found = []
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "shelve") for n in names):
                    found.append(f"{rel}:{node.lineno} imports {names}")
        for call, name, owner in _calls(tree):
            if name == "load" and owner == "torch":
                wo = _keyword(call, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    found.append(f"{rel}:{call.lineno} torch.load without weights_only=True")
    assert found == []


def test_transformers_model_loads_are_pinned_to_safetensors():
    """Every `<Model class>.from_pretrained(...)` passes use_safetensors=True (a GGUF load names
    its gguf_file; tokenizers load no weights)."""
    found, checked = [], 0
    for rel, tree in _sources():
        text = (ROOT / rel).read_text()
        for call, name, owner in _calls(tree):
            if name != "from_pretrained" or "Tokenizer" in owner:
                continue
            checked += 1
            safe = _keyword(call, "use_safetensors")
            gguf = _keyword(call, "gguf_file") is not None or (
                any(k.arg is None for k in call.keywords) and "gguf_file=" in text
            )
            if not (isinstance(safe, ast.Constant) and safe.value is True) and not gguf:
                found.append(f"{rel}:{call.lineno} {owner}.from_pretrained without use_safetensors=True")
    assert found == []
    assert checked >= 1  # the scan sees the calls it is meant to see


class _Trap:
    """Unpickling this writes the marker file: proof that something unpickled the .bin."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_checkpoint(
        "qwen3_moe",
        tmp_path_factory.mktemp("pickle") / "m",
        hidden_size=128,
        moe_intermediate_size=64,
        num_experts=4,
        vocab_size=64,
    )


def _trap_bin(folder, marker):
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    (folder / "training_args.bin").write_bytes(pickle.dumps(_Trap(marker)))


def test_trap_works_when_unpickled(tmp_path):
    marker = tmp_path / "MARKER"
    _trap_bin(tmp_path, marker)
    pickle.loads((tmp_path / "pytorch_model.bin").read_bytes())  # what an unsafe loader would do
    assert marker.read_text() == "unpickled"


def test_quantize_ignores_and_does_not_copy_a_malicious_bin(model_dir, tmp_path, monkeypatch):
    src = tmp_path / "in"
    shutil.copytree(model_dir, src)
    marker = tmp_path / "MARKER"
    _trap_bin(src, marker)
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or pytest.fail("torch.load called"))
    out = quantize(src, tmp_path / "out", "w8a8")
    assert not marker.exists() and loads == []
    assert not list(out.glob("*.bin"))  # pickles of the input are not copied to the output


def test_quantize_of_a_bin_only_folder_is_one_line(model_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(model_dir / "config.json", src / "config.json")
    marker = tmp_path / "MARKER"
    _trap_bin(src, marker)
    r = cli("quantize", f"input={src}", f"output={tmp_path / 'out'}", "scheme=w8a8")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(src) in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


def _float_model_loader():
    from quantfw.calibrate.model import load_float_model

    return load_float_model


def test_float_model_load_prefers_safetensors_and_never_unpickles(model_dir, tmp_path, monkeypatch):
    src = tmp_path / "in"
    shutil.copytree(model_dir, src)
    marker = tmp_path / "MARKER"
    _trap_bin(src, marker)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    model = _float_model_loader()(src)
    assert sum(p.numel() for p in model.parameters()) > 0 and not marker.exists()


def test_float_model_load_of_a_bin_only_folder_is_one_line(model_dir, tmp_path):
    load = _float_model_loader()
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(model_dir / "config.json", src / "config.json")
    marker = tmp_path / "MARKER"
    _trap_bin(src, marker)
    with pytest.raises(CheckpointError) as e:
        load(src)
    assert "\n" not in str(e.value) and str(src) in str(e.value)
    assert not marker.exists()
