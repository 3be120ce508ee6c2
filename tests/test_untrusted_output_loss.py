"""Nothing lost: an output that overlaps the input is refused even with overwrite=true, and
overwrite=true replaces nothing but a quantfw output. Marker files prove the input is intact."""

import hashlib
import shutil

import pytest
from checkpoint_helpers import cli, quantize, reshard

from quantfw.errors import CheckpointError
from quantfw.integrations.hf import save_tiny_checkpoint


def _digest(folder):
    """sha256 over every file below `folder` (names and bytes), symlinks not followed."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("loss")
    one = save_tiny_checkpoint(
        "qwen3_moe", root / "one", hidden_size=128, moe_intermediate_size=64, num_experts=4, vocab_size=64
    )
    return reshard(one, root / "in", 2)


@pytest.fixture
def src(template, tmp_path):
    """A fresh copy of the input in P/in with marker files in it and next to it."""
    p = tmp_path / "P"
    src = p / "in"
    shutil.copytree(template, src)
    (src / "MARKER_INPUT.txt").write_text("must survive")
    (src / "sub").mkdir()
    (src / "sub" / "MARKER_NESTED.txt").write_text("must survive")
    (p / "MARKER_SIBLING.txt").write_text("must survive")
    return src


def _refused(src, output, *needles, overwrite=True):
    before = _digest(src.parent)
    with pytest.raises(CheckpointError) as e:
        quantize(src, output, "w8a8", overwrite=overwrite)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert str(n) in msg, msg
    assert _digest(src.parent) == before  # nothing written or deleted, markers included
    assert (src / "MARKER_INPUT.txt").read_text() == "must survive"
    return msg


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_equal_to_input(src, overwrite):
    _refused(src, src, src, "is the input folder", overwrite=overwrite)


@pytest.mark.parametrize("inside", ["out", "sub", "sub/deeper/out", "."])
def test_output_inside_input(src, inside):
    out = (src / inside) if inside != "." else src / "sub" / ".."
    msg = _refused(src, out, src)
    assert "inside the input" in msg or "is the input folder" in msg


@pytest.mark.parametrize("up", [1, 2])
def test_output_containing_input_eg_its_parent(src, up):
    parent = src.parents[up - 1]
    msg = _refused(src, parent, parent, src)
    assert "contains the input" in msg


def test_symlinked_output_pointing_into_input(src, tmp_path):
    link = tmp_path / "link_out"
    link.symlink_to(src / "sub")
    _refused(src, link, src / "sub", src)
    dangling = tmp_path / "dangling_out"
    dangling.symlink_to(src / "not_yet")
    _refused(src, dangling, src / "not_yet", src)


def test_symlinked_parent_of_output_pointing_at_input(src, tmp_path):
    link = tmp_path / "alias"
    link.symlink_to(src)
    _refused(src, link / "out", src / "out", src)
    _refused(src, link, src, "is the input folder")


def test_input_given_through_a_symlink(src, tmp_path):
    """The input resolves too: an alias of the input's parent is still its parent."""
    alias = tmp_path / "alias_in"
    alias.symlink_to(src)
    _refused(alias, src.parent, "contains the input")


def test_overwrite_refuses_a_folder_that_is_not_a_quantfw_output(src, tmp_path):
    out = tmp_path / "user_data"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match="holds no quantfw checkpoint") as e:
        quantize(src, out, "w8a8", overwrite=True)
    assert str(out) in str(e.value)
    assert (out / "thesis.tex").read_text() == "years of work"
    # a float HF checkpoint is not a quantfw output either
    with pytest.raises(CheckpointError, match="holds no quantfw checkpoint"):
        quantize(src, _copy(src, tmp_path / "another_float"), "w8a8", overwrite=True)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_overwrite_refuses_a_file(src, tmp_path):
    out = tmp_path / "file"
    out.write_text("not a folder")
    with pytest.raises(CheckpointError, match="not a folder"):
        quantize(src, out, "w8a8", overwrite=True)
    assert out.read_text() == "not a folder"


def test_overwrite_replaces_a_quantfw_output(src, tmp_path):
    out = quantize(src, tmp_path / "out", "clip")
    (out / "stale.txt").write_text("from the earlier run")
    before = _digest(src.parent)
    quantize(src, out, "w8a8", overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "quant_model_description.json").is_file()
    assert _digest(src.parent) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_cli_overwrite_on_the_input_parent_one_line(src):
    before = _digest(src.parent)
    r = cli("quantize", f"input={src}", f"output={src.parent}", "scheme=w8a8", "overwrite=true")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("quantfw quantize: error:")
        and "contains the input" in lines[0]
    )
    assert _digest(src.parent) == before
