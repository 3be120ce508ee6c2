import pytest

from quantfw.errors import ConfigError
from quantfw.parallel.placement import Placement
from quantfw.registry import Registry


def test_contiguous_blocks_cover_every_expert_once():
    p = Placement.contiguous(10, 4)
    assert p.experts_of == ((0, 1, 2), (3, 4, 5), (6, 7), (8, 9))
    assert sorted(e for r in range(4) for e in p.primaries(r)) == list(range(10))


def test_declared_placement_with_redundant_copy_has_one_primary():
    p = Placement.from_config([[0, 1, 5], [2, 3, 4, 5]], 6, 2)
    assert p.local(1) == (2, 3, 4, 5)
    assert p.primary(5) == 0
    assert p.primaries(1) == (2, 3, 4)


@pytest.mark.parametrize(
    "lists, message",
    [
        ([[0, 1]], "1 rank lists for a world of 2"),
        ([[0, 1], [2]], "experts 3 are placed on no rank"),
        ([[0, 1, 9], [2, 3]], "expert id 9 is not in [0, 4)"),
        ([[0, 0, 1], [2, 3]], "listed twice"),
        ([[0, True], [2, 3]], "expert id True"),
    ],
)
def test_bad_placement_is_refused_in_one_line(lists, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Placement.from_config(lists, 4, 2)


def test_registry_refuses_duplicates_and_names_the_available():
    reg = Registry("widget")
    reg.add("a", 1)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.add("a", 2)
    with pytest.raises(ConfigError, match=r"scheme.x: unknown widget 'b' \(available: a\)"):
        reg.get("b", "scheme.x")
    assert reg.group == "quantfw.widgets"
