"""Written checkpoints stay byte-identical: every shipped recipe on its tiny model, and calibrated
runs, against the sha256 recorded by tests/bytes_cases.py (see the fixture's `commit`)."""

import json

import pytest
from bytes_cases import cases, fixture_path, produce


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("bytes")


@pytest.mark.parametrize("name", list(cases()))
def test_output_bytes_match_the_recorded_fixture(name, root):
    recorded = json.loads(fixture_path(name).read_text())
    written = produce(name, root)
    changed = sorted(
        k for k in written.keys() | recorded["files"].keys() if written.get(k) != recorded["files"].get(k)
    )
    assert not changed, f"{name}: files differ from the bytes recorded at {recorded['commit']}: {changed}"
    assert len(written) >= 4  # weights, index, metadata and config at least
