import pytest

from quantfw.errors import ConfigError
from quantfw.layout import expr


def test_shapes_and_conditions():
    env = {"N": 512, "K": 256, "group_size": 128, "weight_bits": 4, "activation_use_clip": True}
    assert expr.shape(["N/2", "K"], env, "t") == (256, 256)
    assert expr.shape(["K/group_size if group_size else 1", "N"], env, "t") == (2, 512)
    assert expr.shape(["K/group_size if group_size else 1", "N"], {**env, "group_size": 0}, "t") == (1, 512)
    assert expr.shape("[N/2, K] if weight_bits == 4 else [N, K]", env, "t") == (256, 256)
    assert expr.holds("weight_bits == 4 and group_size", env, "t")
    assert not expr.holds("not activation_use_clip", env, "t")
    assert expr.holds(None, env, "t")
    assert expr.evaluate("'uint64' if weight_bits == 4 else 'float32'", env, "t") == "uint64"


@pytest.mark.parametrize(
    "text",
    ["__import__('os').system('true')", "N.bit_length()", "[x for x in [1]]", "N[0]", "lambda: 1"],
)
def test_code_is_rejected(text):
    with pytest.raises(ConfigError, match="not allowed|cannot evaluate"):
        expr.evaluate(text, {"N": 8}, "scheme 'evil' runtime.weight.shape")


def test_errors_name_the_place():
    with pytest.raises(
        ConfigError, match=r"scheme 'x' runtime.w.shape: cannot evaluate 'Q': unknown name 'Q'"
    ):
        expr.shape(["Q"], {"N": 1}, "scheme 'x' runtime.w.shape")
    with pytest.raises(ConfigError, match="1408 is not divisible by 256"):
        expr.shape(["K/group_size"], {"K": 1408, "group_size": 256}, "t")
