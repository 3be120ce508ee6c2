"""A recipe folder reads only its own files and the package's conf: no defaults entry, override,
symlink or search path reaches outside, and recipes call no resolvers (environment, clock, ...)."""

import os

import pytest
from hostile import assert_one_line_exit_2, recipe, run_cli, snapshot, write_folder

from quantfw.errors import ConfigError

MODEL = (
    "name: {name}\nhidden_size: 512\nmoe_intermediate_size: 256\nnum_experts: 8\ntop_k: 2\nnum_layers: 2\n"
)


@pytest.fixture
def outside(tmp_path):
    """A model config outside the recipe folder, which no recipe may load."""
    return write_folder(tmp_path / "outside", {"model/evil.yaml": MODEL.format(name="outside")})


ESCAPES = [
    (
        "parent path in an override entry",
        "  - override model: ../../outside/model/evil\n",
        "contains a path separator",
    ),
    ("parent path in a plain entry", "  - ../outside/model/evil@model\n", "contains a path separator"),
    ("absolute entry", "  - /../outside/model/evil@model\n", "is an absolute path"),
    (
        "group with a path separator",
        "  - override model/sub: evil\n",
        "'model/sub' contains a path separator",
    ),
    ("hidden component", "  - override model: .evil\n", "starts with '.'"),
    ("interpolated entry", "  - override model: ${oc.env:MODEL}\n", "contains an interpolation"),
]


@pytest.mark.parametrize("name, entry, message", ESCAPES, ids=[e[0] for e in ESCAPES])
def test_defaults_entries_stay_inside(tmp_path, compose, outside, name, entry, message):
    folder = write_folder(tmp_path / "rec", {"r.yaml": recipe(extra_defaults=entry)})
    with pytest.raises(ConfigError, match=message):
        compose("r", config_dirs=[folder])
    before = snapshot(tmp_path)
    r = run_cli("plan", "--config-dir", str(folder), "recipe=r", cwd=tmp_path / "outside")
    assert_one_line_exit_2(r, "defaults entry", message)
    assert snapshot(tmp_path) == before


def test_searchpath_in_a_recipe_file_is_refused(tmp_path, compose, outside):
    folder = write_folder(
        tmp_path / "rec",
        {"r.yaml": recipe(f"searchpath: [file://{outside}]\n", extra_defaults="  - override model: evil\n")},
    )
    with pytest.raises(ConfigError, match="hydra.searchpath: recipes may not extend the config search path"):
        compose("r", config_dirs=[folder])
    r = run_cli("plan", "--config-dir", str(folder), "recipe=r", cwd=tmp_path)
    assert_one_line_exit_2(r, "hydra.searchpath")


def test_symlink_out_of_the_folder_is_refused(tmp_path, compose, outside):
    folder = write_folder(tmp_path / "rec", {"r.yaml": recipe(extra_defaults="  - override model: evil\n")})
    (folder / "model").mkdir()
    (folder / "model" / "evil.yaml").symlink_to(outside / "model" / "evil.yaml")
    with pytest.raises(ConfigError, match=r"model/evil.yaml: links outside the config folder"):
        compose("r", config_dirs=[folder])
    (folder / "model" / "evil.yaml").unlink()
    (folder / "model").rmdir()
    (folder / "model").symlink_to(outside / "model")  # a linked group folder
    with pytest.raises(ConfigError, match="links outside the config folder"):
        compose("r", config_dirs=[folder])


def test_fifo_is_refused_without_blocking(tmp_path, compose):
    folder = write_folder(tmp_path / "rec", {"r.yaml": recipe(extra_defaults="  - override model: evil\n")})
    (folder / "model").mkdir()
    os.mkfifo(folder / "model" / "evil.yaml")
    with pytest.raises(ConfigError, match="model/evil.yaml: not a regular file"):
        compose("r", config_dirs=[folder])
    r = run_cli("plan", "--config-dir", str(folder), "recipe=r", cwd=tmp_path, timeout=60)
    assert_one_line_exit_2(r, "not a regular file")


@pytest.mark.parametrize(
    "override, message",
    [
        ("model=../outside/model/evil", "contains a path separator"),
        ("model=/etc/passwd", "is an absolute path"),
        ("model/x=tiny", "contains a path separator"),
    ],
)
def test_command_line_group_overrides_stay_inside(tmp_path, compose, outside, override, message):
    with pytest.raises(ConfigError, match=message):
        compose("default", [override])
    r = run_cli("plan", override, cwd=tmp_path)
    assert_one_line_exit_2(r, message)
    if override.startswith("model="):  # the same value inside a sweep
        r = run_cli("plan", "-m", f"model=tiny,{override.split('=', 1)[1]}", cwd=tmp_path)
        assert_one_line_exit_2(r, message)


def test_missing_config_dir_is_one_line(tmp_path):
    r = run_cli("plan", "--config-dir", str(tmp_path / "nope"), cwd=tmp_path)
    assert_one_line_exit_2(r, "does not exist")
    (tmp_path / "file").write_text("x")
    r = run_cli("plan", f"hydra.searchpath=[{tmp_path / 'file'}]", cwd=tmp_path)
    assert_one_line_exit_2(r, "is not a folder")
    r = run_cli("plan", "hydra.searchpath=[pkg://os]", cwd=tmp_path)
    assert_one_line_exit_2(r, "only folders")


RESOLVERS = [
    ("environment", "scheme:\n  doc: ${oc.env:HOME}\n", "oc.env"),
    ("clock", "scheme:\n  doc: ${now:%H}\n", "now"),
    ("decode", "seed: ${oc.decode:'3'}\n", "oc.decode"),
    ("the package's own tmp resolver", "out: ${quantfw_tmp:}/x.json\n", "quantfw_tmp"),
    ("nested inside a plain reference", "scheme:\n  doc: ${model.${oc.env:KEY}}\n", "oc.env"),
    ("hydra resolver", "scheme:\n  doc: ${hydra:runtime.cwd}\n", "hydra"),
]


@pytest.mark.parametrize("name, body, resolver", RESOLVERS, ids=[r[0] for r in RESOLVERS])
def test_recipes_call_no_resolvers(tmp_path, compose, name, body, resolver):
    folder = write_folder(tmp_path / "rec", {"r.yaml": recipe(body=body)})
    with pytest.raises(ConfigError, match=rf"may not call resolvers \(\${{{resolver}:"):
        compose("r", config_dirs=[folder])
    r = run_cli("plan", "--config-dir", str(folder), "recipe=r", cwd=tmp_path)
    assert_one_line_exit_2(r, f"${{{resolver}:")


def test_command_line_resolvers_are_refused(tmp_path, compose):
    with pytest.raises(ConfigError, match=r"scheme.doc=\$\{oc.env:HOME\}"):
        compose("default", ["scheme.doc=${oc.env:HOME}"])


def test_plain_references_stay_and_bad_ones_are_one_line(tmp_path, compose):
    folder = write_folder(
        tmp_path / "rec",
        {
            "ok.yaml": recipe(body="scheme:\n  doc: for ${model.name}\n"),
            "missing.yaml": recipe(body="scheme:\n  doc: ${model.nope}\n"),
            "cycle.yaml": recipe(body="scheme:\n  doc: ${model.doc}\nmodel:\n  doc: ${scheme.doc}\n"),
        },
    )
    broken = write_folder(tmp_path / "broken", {"r.yaml": recipe(body="scheme:\n  doc: ${model.name\n")})
    assert compose("ok", config_dirs=[folder]).scheme.doc == "for tiny"
    with pytest.raises(ConfigError, match="nope"):
        compose("missing", config_dirs=[folder])
    with pytest.raises(ConfigError, match=r"Recursive interpolation.*\(key: "):
        compose("cycle", config_dirs=[folder])
    with pytest.raises(
        ConfigError, match=r"r.yaml: not a YAML config \(no viable alternative at input '\$\{model.name'"
    ):
        compose("r", config_dirs=[broken])
    for name, needle in (("missing", "model.nope"), ("cycle", "Recursive interpolation")):
        r = run_cli("plan", "--config-dir", str(folder), f"recipe={name}", cwd=tmp_path)
        assert_one_line_exit_2(r, needle)


def test_user_folder_recipes_still_work(tmp_path):
    folder = write_folder(
        tmp_path / "mine",
        {
            "model/small.yaml": MODEL.format(name="small"),
            "small_w8a8.yaml": recipe(
                extra_defaults="  - override model: small\n  - override scheme: w8a8\n"
            ),
            "on_shipped.yaml": "defaults:\n  - deepseek_v3_w4a8\n  - override model: small\n  - _self_\n",
        },
    )
    for name, text in (("small_w8a8", "model=small scheme=w8a8"), ("on_shipped", "model=small scheme=w4a8")):
        r = run_cli("plan", "--config-dir", str(folder), f"recipe={name}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert text in r.stdout
