"""A checkpoint is read only inside its folder: every file (shard, index entry, config.json,
description, extra file) resolves, symlinks followed, to a regular file inside the folder; a FIFO
or a device is refused without being opened (so nothing blocks)."""

from __future__ import annotations

import json
import os
import stat

import pytest
from hostile_checkpoints import copy, edit_json, index_of, one_line, python, quantized, refused, run, shard_of

from quantfw.errors import CheckpointError
from quantfw.io.loader import open_checkpoint
from quantfw.io.reader import CheckpointReader


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    return {s: quantized(root, s) for s in ("clip", "w4a8")}


@pytest.fixture
def clip(ckpts, tmp_path):
    return copy(ckpts["clip"], tmp_path / "in" / "ckpt")


@pytest.fixture
def w4a8(ckpts, tmp_path):
    return copy(ckpts["w4a8"], tmp_path / "in" / "ckpt")


def _outside(tmp_path, src):
    """Move a file out of the folder, returning where it went (the bytes are valid)."""
    dst = tmp_path / "elsewhere" / src.name
    dst.parent.mkdir(exist_ok=True)
    os.replace(src, dst)
    return dst


def test_valid_checkpoint_opens_and_links_inside_are_followed(clip):
    # positive control: a shard moved into a subfolder and linked from its place is inside
    shard = shard_of(clip)
    (clip / "blobs").mkdir()
    os.replace(shard, clip / "blobs" / "abc123")
    shard.symlink_to(clip / "blobs" / "abc123")
    op = open_checkpoint(clip)
    assert op.scheme.name == "w4a8_clip" and len(op.reader.keys()) > 100


def test_shard_symlinked_outside_is_refused(clip, tmp_path):
    shard = shard_of(clip)
    shard.symlink_to(_outside(tmp_path, shard))
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(clip)
    msg = one_line(e)
    assert shard.name in msg and "outside the checkpoint folder" in msg
    line = refused(run("check", f"checkpoint={clip}"))
    assert shard.name in line and "outside the checkpoint folder" in line


@pytest.mark.parametrize("entry", ["../x.safetensors", "sub/../../x.safetensors", "ABS"])
def test_index_entry_outside_is_refused(clip, tmp_path, entry):
    # a valid shard really exists at the target: only the name rule can stop the read
    target = _outside(tmp_path, shard_of(clip))
    entry = str(target) if entry == "ABS" else entry
    if entry.startswith(".."):
        os.replace(target, clip.parent / "x.safetensors")
    edit_json(index_of(clip), lambda d: d["weight_map"].update(dict.fromkeys(d["weight_map"], entry)))
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(clip)
    msg = one_line(e)
    assert entry in msg and "outside the checkpoint folder" in msg


def test_config_json_symlinked_outside_is_refused(clip, tmp_path):
    cfg = clip / "config.json"
    cfg.symlink_to(_outside(tmp_path, cfg))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(clip)
    assert "config.json" in one_line(e) and "outside the checkpoint folder" in one_line(e)


def test_description_symlinked_outside_is_refused(w4a8, tmp_path):
    desc = w4a8 / "quant_model_description.json"
    desc.symlink_to(_outside(tmp_path, desc))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(w4a8)
    assert "quant_model_description.json" in one_line(e) and "outside" in one_line(e)


def _fifo_read(folder):
    """Open the folder in a fresh interpreter; a blocking open would hit the timeout."""
    return python(
        "from quantfw.io.loader import open_checkpoint\n"
        "from quantfw.errors import CheckpointError\n"
        f"try:\n    open_checkpoint({str(folder)!r})\nexcept CheckpointError as e:\n    print(e)\n",
        timeout=60,
    )


@pytest.mark.parametrize("which", ["shard", "index", "config.json", "quant_model_description.json"])
def test_fifo_is_refused_without_blocking(w4a8, which):
    path = {"shard": shard_of(w4a8), "index": index_of(w4a8)}.get(which, w4a8 / which)
    path.unlink()
    os.mkfifo(path)
    r = _fifo_read(w4a8)  # raises TimeoutExpired if anything opened the FIFO
    assert r.returncode == 0, r.stderr
    assert path.name in r.stdout and "not a regular file (found a FIFO)" in r.stdout


def test_fifo_shard_without_index_via_cli(w4a8):
    index_of(w4a8).unlink()
    os.mkfifo(w4a8 / "zz.safetensors")
    line = refused(run("check", f"checkpoint={w4a8}", timeout=60))
    assert "zz.safetensors" in line and "FIFO" in line


@pytest.mark.parametrize("name", ["shard", "config.json"])
def test_symlink_to_dev_zero_is_refused(clip, name):
    path = shard_of(clip) if name == "shard" else clip / name
    path.unlink()
    path.symlink_to("/dev/zero")
    r = _fifo_read(clip)
    assert r.returncode == 0, r.stderr
    assert path.name in r.stdout and "/dev/zero" in r.stdout and "outside the checkpoint folder" in r.stdout


def test_device_inside_the_folder_is_refused(clip):
    shard = shard_of(clip)
    shard.unlink()
    try:  # a character device like /dev/zero, inside the folder (needs CAP_MKNOD)
        os.mknod(shard, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except PermissionError:
        pytest.skip("cannot create a device node here")
    r = _fifo_read(clip)
    assert r.returncode == 0, r.stderr
    assert shard.name in r.stdout and "not a regular file (found a character device)" in r.stdout


def test_directory_in_place_of_a_listed_shard(clip):
    shard = shard_of(clip)
    shard.unlink()
    shard.mkdir()
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(clip)
    assert shard.name in one_line(e) and "not a regular file (found a directory)" in one_line(e)


def test_directory_named_like_a_shard_without_index(w4a8):
    index_of(w4a8).unlink()
    (w4a8 / "model-extra.safetensors").mkdir()
    line = refused(run("check", f"checkpoint={w4a8}", timeout=60))
    assert "model-extra.safetensors" in line and "directory" in line


def test_index_entry_naming_a_directory_or_not_a_name(clip):
    (clip / "sub.safetensors").mkdir()
    idx = index_of(clip)
    edit_json(idx, lambda d: d["weight_map"].__setitem__("model.norm.weight", "sub.safetensors"))
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(clip)
    assert "sub.safetensors" in one_line(e) and "directory" in one_line(e)
    edit_json(idx, lambda d: d["weight_map"].__setitem__("model.norm.weight", ""))
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(clip)
    assert "shard listed in" in one_line(e) and "'' is not a file name" in one_line(e)


def test_extra_files_are_the_verified_rest(clip, tmp_path):
    (clip / "tokenizer.json").write_text(json.dumps({"model": {}}))
    (clip / "original").mkdir()  # subfolders are skipped, not copied
    (clip / "original" / "params.json").write_text("{}")
    names = [p.name for p in CheckpointReader(clip).extra_files()]
    assert names == ["config.json", "generation_config.json", "tokenizer.json"]


@pytest.mark.parametrize("kind", ["outside", "dev", "fifo", "dir_outside"])
def test_extra_files_refuse_links_out_and_special_files(clip, tmp_path, kind):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for copying")
    entry = clip / "tokenizer.json"
    if kind == "outside":
        entry.symlink_to(secret)
    elif kind == "dev":
        entry.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(entry)
    else:
        entry = clip / "original"
        entry.symlink_to(tmp_path)
    reader = CheckpointReader(clip)
    with pytest.raises(CheckpointError) as e:
        reader.extra_files()
    msg = one_line(e)
    assert entry.name in msg and ("outside the checkpoint folder" in msg or "FIFO" in msg)


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_broken_links_are_one_line(w4a8, tmp_path, kind):
    shard = shard_of(w4a8)
    shard.unlink()
    shard.symlink_to(tmp_path / "gone.safetensors" if kind == "dangling" else shard)
    index_of(w4a8).unlink()  # discovered by name: the link itself is the entry
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(w4a8)
    assert shard.name in one_line(e) and "broken or looping symlink" in one_line(e)
