"""Typed observer configs (`scheme.observers.NAME.FIELD`): the deprecated flat keys give the same
scheme, unknown names and keys are one-line errors naming the observer's parameters, observers in
use that share a provenance key must agree, signature() covers what the observer in use reads,
the written provenance keeps its keys; and the quantizer math on 2..8-bit grids."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from quantfw.errors import ConfigError
from quantfw.io import metadata
from quantfw.quantize import observers as O
from quantfw.quantize import primitives as P
from quantfw.quantize.weights import quantize_weight
from quantfw.registry import Registry
from quantfw.schemes.scheme import FLAGS, Scheme


def _scheme(compose, overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return Scheme.from_config(compose("default", ["scheme=w4a8", *overrides]).scheme)


def _error(compose, overrides) -> str:
    with pytest.raises(ConfigError) as e:
        _scheme(compose, overrides)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_each_observer_owns_a_typed_config_read_from_the_scheme(compose):
    s = _scheme(compose, ["scheme.weight_observer=gptq", "scheme.observers.gptq.damp=0.05"])
    cfg = O.settings(s.flags)
    assert isinstance(cfg, O.GptqConfig) and cfg.damp == 0.05 and cfg.block == 128
    assert O.settings(s.flags, "ssz") == O.SszConfig()  # untouched observers keep their defaults
    # each registered observer's parameters are the fields of its config, nothing else
    assert set(O.get_observer("mse").fields()) == {"grid", "min_ratio"}
    assert set(O.get_observer("minmax").fields()) == set()
    assert {"min_tokens", "fallback"} <= set(O.get_observer("learned_clip").fields())


@pytest.mark.parametrize(
    "old, new",
    [
        ("scheme.gptq_damp=0.05", "scheme.observers.gptq.damp=0.05"),
        ("scheme.observer_min_tokens=4", "scheme.observers.gptq.min_tokens=4"),
        ("scheme.gptq_scale_observer=minmax", "scheme.observers.gptq.scale_observer=minmax"),
    ],
)
def test_a_deprecated_flat_key_gives_the_same_scheme_with_a_one_line_note(compose, old, new):
    gptq = "scheme.weight_observer=gptq"
    cfg = compose("default", ["scheme=w4a8", gptq, old]).scheme
    O._NOTED.clear()  # the note is shown once per process; this test wants to see it
    with pytest.warns(FutureWarning) as notes:
        flat = Scheme.from_config(cfg)
    (note,) = [str(w.message) for w in notes]
    assert f"scheme.{old.split('=')[0].split('.')[1]} is deprecated" in note and new.split("=")[0] in note
    assert "\n" not in note
    nested = _scheme(compose, [gptq, new])
    assert flat.flags == nested.flags and flat.signature() == nested.signature()
    assert nested.signature() != _scheme(compose, [gptq]).signature()


def test_a_flat_key_sets_every_observer_having_that_parameter(compose):
    with pytest.warns(FutureWarning, match=r"observers\.learned_clip\.grid / scheme\.observers\.mse\.grid"):
        Scheme.from_config(compose("default", ["scheme=w4a8", "scheme.observer_grid=7"]).scheme)
    for name in ("mse", "learned_clip"):
        s = _scheme(compose, [f"scheme.weight_observer={name}", "scheme.observer_grid=7"])
        assert O.settings(s.flags).grid == 7


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "+scheme.observers.gptq.dampp=1",
            "observers.gptq.dampp: not a parameter of observer 'gptq' (its parameters: "
            "min_tokens, fallback, damp, block, act_order, scale_observer)",
        ),
        ("+scheme.observers.minmax.grid=3", "not a parameter of observer 'minmax' (its parameters: none)"),
        ("+scheme.observers.awq.grid=3", "observers.awq: no observer 'awq' (available: gptq, learned_clip,"),
        ("scheme.observers.mse.grid=1", "observers.mse.grid=1 (allowed: an int >= 2)"),
        (
            "scheme.observers.gptq.fallback=gptq",
            "observers.gptq.fallback='gptq' (allowed, data-free observers:",
        ),
    ],
)
def test_bad_observer_configs_are_one_line_errors_naming_the_key(compose, override, expected):
    msg = _error(compose, ["scheme.weight_observer=gptq", override])
    assert expected in msg and "scheme 'w4a8'" in msg


def test_observers_in_use_sharing_a_provenance_key_must_agree(compose):
    clip = ["scheme.weight_observer=learned_clip", "scheme.observers.learned_clip.fallback=mse"]
    msg = _error(compose, [*clip, "scheme.observers.learned_clip.grid=10"])
    assert "observers.learned_clip.grid=10 and observers.mse.grid=20" in msg and "(observer_grid)" in msg
    both = _scheme(compose, [*clip, "scheme.observers.learned_clip.grid=10", "scheme.observers.mse.grid=10"])
    assert both.flags["observer_grid"] == 10
    # an observer not in use may hold another value: it cannot change the output
    alone = _scheme(compose, ["scheme.weight_observer=learned_clip", "scheme.observers.learned_clip.grid=10"])
    assert alone.flags["observer_grid"] == 10 and O.settings(alone.flags, "mse").grid == 10


def test_signature_covers_the_parameters_of_the_observers_in_use(compose):
    mse = ["scheme.weight_observer=mse"]
    base = _scheme(compose, mse).signature()
    assert _scheme(compose, [*mse, "scheme.observers.gptq.damp=0.05"]).signature() == base
    assert _scheme(compose, [*mse, "scheme.observers.learned_clip.grid=7"]).signature() == base
    assert _scheme(compose, [*mse, "scheme.observers.mse.grid=7"]).signature() != base
    gptq = ["scheme.weight_observer=gptq"]
    g = _scheme(compose, gptq).signature()
    assert _scheme(compose, [*gptq, "scheme.observers.mse.min_ratio=0.7"]).signature() != g  # scale observer
    assert _scheme(compose, [*gptq, "scheme.observers.gptq.scale_observer=ssz"]).signature() != g
    assert _scheme(compose, [*gptq, "scheme.observers.ssz.iters=3"]).signature() == g
    ssz = [*gptq, "scheme.observers.gptq.scale_observer=ssz"]
    assert (
        _scheme(compose, [*ssz, "scheme.observers.ssz.iters=3"]).signature()
        != _scheme(compose, ssz).signature()
    )


def test_the_written_provenance_keeps_the_flat_keys(compose):
    s = _scheme(compose, ["scheme.weight_observer=gptq", "scheme.observers.gptq.damp=0.05"])
    flags = metadata.provenance(s, "msmodelslim", None)["flags"]
    observer_keys = {"weight_observer", *(k for o in O.OBSERVERS.names() for k in O.get_observer(o).params)}
    assert set(flags) == {*(k for k in FLAGS if k in s.flags), *observer_keys}
    assert flags["gptq_damp"] == 0.05 and flags["weight_observer"] == "gptq"
    assert O.data_params(s.flags) == {k: flags[k] for k in O.data_params(s.flags)}


def test_a_plugin_observer_config_gets_its_own_keys(compose, monkeypatch):
    reg = Registry("observer")
    for name, obs in O.OBSERVERS.items():
        reg.add(name, obs)
    monkeypatch.setattr(O, "OBSERVERS", reg)

    @dataclasses.dataclass(frozen=True)
    class Shrink:
        ratio: float = 1.0

    @O.register_observer("shrunk", config=Shrink)
    def shrunk(w, flags, x=None):
        """min-max scales times a ratio."""
        qw = O.get_observer("minmax").fn(w, flags, x)
        return O.blocks(w, flags).finish(qw.s1.unsqueeze(-1) * O.settings(flags, "shrunk").ratio)

    s = Scheme.from_config(
        {
            **_cfg(compose),
            "group_size": 0,
            "weight_observer": "shrunk",
            "observers": {"shrunk": {"ratio": 0.5}},
        }
    )
    assert s.flags["shrunk_ratio"] == 0.5 and s.output_flags()["shrunk_ratio"] == 0.5
    w = torch.randn(8, 32)
    assert torch.allclose(quantize_weight(w, s.flags).s1, P.quantize_per_channel(w, 4)[1] * 0.5)
    with pytest.raises(
        ConfigError,
        match=r"observers\.shrunk\.size: not a parameter of observer 'shrunk' \(its parameters: ratio\)",
    ):
        Scheme.from_config(
            {**_cfg(compose), "weight_observer": "shrunk", "observers": {"shrunk": {"size": 2}}}
        )
    with pytest.raises(TypeError, match="must extend DataDriven"):
        O.register_observer("needy", needs_data=True, config=Shrink)(shrunk)


def _cfg(compose) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose("default", ["scheme=w4a8"]).scheme)


# ---------------------------------------------------------------------------------------------
# Grids of any width from 2 to 8 bits.

BITS = (2, 3, 4, 5, 6, 8)


def _w(n=16, k=128, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.linspace(0.5, 2.0, n).unsqueeze(1)


def _err(w, qw) -> float:
    return float((w - qw.dequantize()).square().sum())


@pytest.mark.parametrize("bits", BITS)
def test_per_channel_values_lie_on_the_bits_grid_and_reach_its_top(bits):
    w = _w()
    q, s = P.quantize_per_channel(w, bits)
    top = 2 ** (bits - 1) - 1
    assert q.abs().amax(dim=-1).eq(top).all()  # each channel's amax lands on the top level
    assert torch.equal(s, w.abs().amax(dim=-1) / top)
    assert torch.equal(q.float(), torch.round(w / s.unsqueeze(-1)))


@pytest.mark.parametrize("bits", [b for b in BITS if b < 8])
def test_two_level_values_lie_on_the_bits_grid_per_group(bits):
    w = _w()
    q, s1, s2 = P.quantize_two_level(w, 32, bits)
    top = 2 ** (bits - 1) - 1
    groups = q.reshape(16, 4, 32).abs().amax(dim=-1)
    assert groups.eq(top).all() and s2.shape == (16, 4)
    q8 = torch.round(w / s1.unsqueeze(-1)).reshape(16, 4, 32)
    assert torch.equal(s2, q8.abs().amax(dim=-1) / top)


@pytest.mark.parametrize("name", ["minmax", "mse", "ssz", "gptq"])
@pytest.mark.parametrize("group_size", [0, 32])
def test_observer_error_falls_as_bits_grow_and_values_stay_on_the_grid(name, group_size):
    w, x = _w(), torch.randn(256, 128, generator=torch.Generator().manual_seed(1))
    errors = []
    for bits in BITS:
        if group_size and bits == 8:
            continue
        flags = {"weight_bits": bits, "group_size": group_size, "weight_observer": name}
        qw = quantize_weight(w, flags, x if name == "gptq" else None)
        assert qw.info["observer"] == name
        assert qw.q.abs().max() <= 2 ** (bits - 1) - 1 and torch.equal(qw.q.float(), qw.q.float().round())
        assert (qw.s2 is not None) == bool(group_size)
        errors.append(_err(w, qw))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors


def test_the_bits_bound_is_a_one_line_error():
    for bad in (1, 9, True):
        with pytest.raises(ConfigError, match=r"weight bits must be an int from 2 to 8"):
            P.quantize_per_channel(_w(), bad)


@pytest.mark.parametrize("fmt", ["msmodelslim", "compressed_tensors"])
@pytest.mark.parametrize("scheme, bits", [("w4a8", 3), ("w8a8", 5), ("w8a8", 6)])
def test_a_width_the_format_cannot_store_is_refused_at_compose_naming_it(compose, fmt, scheme, bits):
    with pytest.raises(
        ConfigError, match=rf"format '{fmt}' \(format/{fmt}\.yaml\): weight_bits={bits} \(allowed: 4, 8\)"
    ):
        compose(
            "default",
            [f"scheme={scheme}", "scheme.group_size=0", f"scheme.weight_bits={bits}", f"format={fmt}"],
        )


@pytest.mark.parametrize("bits", [5, 8])
def test_a_width_the_scheme_runtime_layout_cannot_hold_is_refused_naming_it(compose, bits):
    with pytest.raises(ConfigError) as e:
        compose("default", ["scheme=w4a8_clip", f"scheme.weight_bits={bits}"])
    assert str(e.value) == (
        f"scheme 'w4a8_clip' (scheme/w4a8_clip.yaml): weight_bits={bits} (allowed: 2 to 4): "
        "its weight_bits_range, what its runtime layout holds"
    )
    assert Scheme.from_config({**_cfg(compose), "weight_bits": 3}).flags["weight_bits"] == 3
