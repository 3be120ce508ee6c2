"""Checkpoint metadata as real runtimes read it, one registered writer/detector per format style.

- msmodelslim: `quant_model_description.json` (per-tensor type, "version", "group_size",
  "model_quant_type") next to the original config.json (spec sections 3 and 8).
- compressed_tensors: config.json with `quantization_config` (config_groups with
  `activation_use_clip`, spec section 4).
Both carry a `quantfw` provenance block. Detection reads per-tensor facts of the routed experts,
never the global model_quant_type alone (spec section 8).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from quantfw.errors import CheckpointError
from quantfw.io.fields import Fields
from quantfw.schemes.scheme import Scheme

VERSION = "0.1.0"
DESCRIPTION_NAMES = ("quant_model_description.json", "quant_model_description_w8a8_dynamic.json")
FLOAT = "FLOAT"
LINEAR_W8A8 = "W8A8_DYNAMIC"  # non-expert linears written W8A8 (recipe quantize.targets)


def expert_type(scheme: Scheme) -> str:
    """msModelSlim's per-tensor type string of the routed-expert tensors."""
    return "W4A8_DYNAMIC" if scheme.flags["weight_bits"] == 4 else "W8A8_DYNAMIC"


def provenance(scheme: Scheme, format_name: str, alpha_method: str | None) -> dict[str, Any]:
    return {
        "producer": "quantfw",
        "version": VERSION,
        "scheme": scheme.name,
        "flags": dict(sorted(scheme.flags.items())),
        "format": format_name,
        "alpha_method": alpha_method,
    }


def dump(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def produced_by_quantfw(folder: Path) -> bool:
    """Whether `folder` holds a checkpoint quantfw wrote (its metadata carries the quantfw block)."""
    for name, block in (
        ("quant_model_description.json", lambda d: d.get("quantfw")),
        ("config.json", lambda d: (d.get("quantization_config") or {}).get("quantfw")),
    ):
        path = folder / name
        if not path.is_file() or path.stat().st_size > 1 << 26:
            continue
        try:
            prov = block(json.loads(path.read_text()))
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(prov, dict) and prov.get("producer") == "quantfw":
            return True
    return False


# ---------------------------------------------------------------------------------------- writers


def _write_msmodelslim(out: Path, config: dict, scheme: Scheme, types: Mapping[str, str], prov: dict) -> None:
    desc: dict[str, Any] = dict(sorted(types.items()))
    desc["version"] = "1.0.0"  # packed int4 + scale_bias present (spec section 3)
    desc["group_size"] = scheme.flags.get("group_size", 0)
    # The global type is informative only; readers decide per tensor (spec section 8).
    desc["model_quant_type"] = expert_type(scheme)
    desc["quantfw"] = prov
    dump(out / "quant_model_description.json", desc)
    # The input's own quantization_config (an FP8 release's) does not describe this output.
    dump(out / "config.json", {k: v for k, v in config.items() if k != "quantization_config"})


_ACTS = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}


def _expert_group(f: Mapping[str, Any], targets: list[str]) -> dict[str, Any]:
    """A compressed-tensors config group of routed experts quantized with scheme flags `f`."""
    weights = {"num_bits": f["weight_bits"], "type": "int", "symmetric": True, "dynamic": False}
    weights.update(
        {"strategy": "group", "group_size": f["group_size"]}
        if f.get("group_size")
        else {"strategy": "channel"}
    )
    return {
        "targets": targets,
        "weights": weights,
        "input_activations": dict(_ACTS),
        "activation_use_clip": bool(f.get("activation_use_clip")),
    }


def _layer_groups(prov: dict) -> dict[str, Any]:
    """One config group per scheme of the recipe's per-layer choices (prov `layers`), targeting
    the routed experts of its layers by `re:` module name; group_1 (MoEGMM) holds the others."""
    by_scheme: dict[str, tuple[dict, list[str]]] = {}
    for layer, choice in (prov.get("layers") or {}).items():
        if choice.get("applies") == "routed experts":
            by_scheme.setdefault(choice["scheme"], (choice["flags"], []))[1].append(layer)
    return {
        f"group_{i + 2}": _expert_group(flags, [rf"re:.*layers\.({'|'.join(layers)})\.(.*\.)?experts\..*"])
        for i, (flags, layers) in enumerate(by_scheme.values())
    }


def _write_compressed_tensors(
    out: Path, config: dict, scheme: Scheme, types: Mapping[str, str], prov: dict
) -> None:
    acts = _ACTS
    # Routed experts are group_1 (MoEGMM); non-expert linears written W8A8 are group_0 ("Linear"),
    # claimed only when there are some. Every float `.weight` is listed in `ignore`.
    ignore = sorted(k[: -len(".weight")] for k, t in types.items() if t == FLOAT and k.endswith(".weight"))
    linears = bool((prov.get("linears") or {}).get("w8a8"))
    qc = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            **(
                {
                    "group_0": {
                        "targets": ["Linear"],
                        "weights": {
                            "num_bits": 8,
                            "type": "int",
                            "symmetric": True,
                            "dynamic": False,
                            "strategy": "channel",
                        },
                        "input_activations": acts,
                        "activation_use_clip": False,
                    }
                }
                if linears
                else {}
            ),
            "group_1": _expert_group(scheme.flags, ["MoEGMM"]),
            **_layer_groups(prov),
        },
        "ignore": ignore,
        "quantfw": prov,
    }
    dump(out / "config.json", {**config, "quantization_config": qc})  # replaces the input's, never merged


WRITERS: dict[str, Callable[..., None]] = {
    "msmodelslim": _write_msmodelslim,
    "compressed_tensors": _write_compressed_tensors,
}


def write(style: str, out: Path, config: dict, scheme: Scheme, types: Mapping[str, str], prov: dict) -> None:
    WRITERS[style](out, config, scheme, types, prov)


# -------------------------------------------------------------------------------------- detection

PACK_QUANTIZED = "pack-quantized"
# Values detection reads, typed strictly (quantfw.io.fields): anything else is refused naming the key.
STRATEGIES = ("channel", "group")  # weight strategies of the routed experts that can be read
MAX_GROUP = 1 << 16
EXPERT_TYPES = ("W8A8_DYNAMIC", "W4A8_DYNAMIC")  # msModelSlim per-tensor types of readable experts
PACKED_INT4_VERSION = "1.0.0"  # msModelSlim description version of packed int4 + scale_bias
DESCRIPTION_FIELDS = ("version", "group_size", "model_quant_type", "quantfw")


def _targets_module(targets, name: str) -> bool:
    """compressed-tensors target matching for one Linear module: class name, exact name or `re:`."""
    for t in targets or ():
        if t == "Linear" or t == name or (t.startswith("re:") and _matches(t[3:], name)):
            return True
    return False


def _matches(pattern: str, name: str) -> bool:
    try:
        return re.match(pattern, name) is not None
    except re.error:
        return False  # a broken pattern targets nothing (reported as no group targeting the experts)


def _weights_group(g: Fields, readable_bits: tuple[int, ...]) -> tuple[int, int]:
    """(num_bits, group_size) of a config group's `weights`; group_size 0 = per channel.
    A strategy/group_size combination other than channel (no size) or group (a size) is refused."""
    w = g.obj("weights", required=True)
    bits = w.integer("num_bits", 1, 64)
    if bits not in readable_bits:
        raise w.fail("num_bits", f"one of {list(readable_bits)}", bits)
    w.string("type", ("int",), default="int")
    w.boolean("symmetric", default=True)
    w.boolean("dynamic", default=False)
    strategy = w.string("strategy", STRATEGIES)
    if strategy == "channel":
        if "group_size" in w:
            raise w.fail("group_size", "null with strategy channel", w.raw("group_size"))
        return bits, 0
    return bits, w.integer("group_size", 1, MAX_GROUP)


def _activations(g: Fields) -> None:
    """Expert input activations, when declared, must be int8 dynamic per token (what W4A8/W8A8 run)."""
    acts = g.obj("input_activations")
    if acts is None:
        return
    acts.integer("num_bits", 8, 8, (8,))
    acts.string("type", ("int",), default="int")
    if not acts.boolean("dynamic"):
        raise acts.fail("dynamic", "true (int8 dynamic per-token activations)", False)
    acts.string("strategy", ("token",), default="token")
    acts.boolean("symmetric", default=True)


def _detect_pack_quantized(reader, qc: Fields, weight_key: str) -> list[str]:
    """llm-compressor int4 "pack-quantized" -> scheme w4a8 (group size from the config group
    that targets the routed experts) read through format pack_quantized."""
    where = reader.folder / "config.json"
    module = weight_key.rsplit(".", 1)[0]
    if any(
        i == module or (i.startswith("re:") and _matches(i[3:], module)) for i in qc.strings("ignore", [])
    ):
        raise CheckpointError(
            f"{where}: quantization_config ignores routed expert {module} (it is not quantized)"
        )
    groups = [g for _, g in (qc.obj("config_groups") or Fields({}, where)).objects()]
    groups = [g for g in groups if _targets_module(g.strings("targets", []), module)]
    if not groups:
        raise CheckpointError(f"{where}: no quantization_config group targets routed expert {module}")
    g = groups[0]
    fmt = g.string("format", default=None) or qc.string("format", default=None)
    w = g.obj("weights", required=True)
    facts = (
        fmt,
        w.integer("num_bits", 1, 64),
        w.string("type", default="int"),
        w.boolean("symmetric", default=True),
        w.string("strategy"),
    )
    if facts[:4] != (PACK_QUANTIZED, 4, "int", True) or facts[4] not in STRATEGIES:
        raise CheckpointError(
            f"{where}: expert group {g.raw('targets')} has format={fmt} num_bits={facts[1]} "
            f"type={facts[2]} symmetric={facts[3]} strategy={facts[4]} "
            "(readable: pack-quantized, 4-bit int, symmetric, group or channel)"
        )
    _, group = _weights_group(g, (4,))
    acts = g.obj("input_activations")
    if acts is not None and (
        acts.raw("num_bits"),
        acts.raw("type", "int"),
        acts.raw("dynamic"),
    ) != (8, "int", True):
        raise CheckpointError(
            f"{where}: expert input_activations {dict(acts.data)} (W4A8 runs int8 dynamic per-token activations)"
        )
    _activations(g)
    scale_key = module + ".weight_scale"
    if scale_key not in reader:
        raise CheckpointError(f"{reader.folder}: '{scale_key}' missing (pack-quantized needs weight_scale)")
    dtype = str(reader.info(scale_key).dtype).removeprefix("torch.")
    return [
        "scheme=w4a8",
        f"scheme.group_size={group}",
        "scheme.activation_use_clip=false",
        "format=pack_quantized",
        f"format.tensors.weight_scale.dtype={dtype}",
    ]


def _detect_int_quantized(reader, qc: Fields, module: str = "") -> list[str]:
    """compressed-tensors int-quantized (cann-recipes, quantfw): the group targeting this routed
    expert `module` by name (a per-layer choice), else the MoEGMM config group."""
    where = reader.folder / "config.json"
    groups = list((qc.obj("config_groups") or Fields({}, where)).objects())
    named = [
        g
        for _, g in groups
        if _targets_module([t for t in g.strings("targets", []) if t != "Linear"], module)
    ]
    moe = named or [g for _, g in groups if "MoEGMM" in g.strings("targets", [])]
    if not moe:
        raise CheckpointError(
            f"{where}: quantization_config has no config group targeting MoEGMM "
            f"(found targets: {[g.raw('targets') for _, g in groups]})"
        )
    g = moe[0]
    bits, group = _weights_group(g, (4, 8))
    _activations(g)
    clip = g.boolean("activation_use_clip", default=False)
    if group:
        # this format stores experts per channel only (conf/format/compressed_tensors.yaml)
        raise g.obj("weights").fail("strategy", "channel (int-quantized experts are per channel)", "group")
    if bits == 8:
        if clip:
            raise g.fail("activation_use_clip", "false for 8-bit experts", clip)
        return ["scheme=w8a8", "format=compressed_tensors"]
    return [
        "scheme=w4a8_clip",
        f"scheme.activation_use_clip={str(clip).lower()}",
        "format=compressed_tensors",
    ]


def quantization_config(reader) -> Fields | None:
    """config.json's quantization_config (an object, or absent)."""
    return Fields(reader.config(), reader.folder / "config.json").obj("quantization_config")


def detect(reader, expert_keys: Mapping[str, str], experts: Sequence[str] = ()) -> list[str]:
    """Recipe overrides (scheme, format, flags) that match the checkpoint.

    `expert_keys` maps suffix -> a full key of one routed expert's gate projection, plus 'alpha'
    -> its down_proj.alpha key (present or not); `experts` lists every routed-expert key (their
    msModelSlim entries must agree). Per-tensor facts decide, not global fields.
    """
    qc = quantization_config(reader)
    if qc is not None and qc.string("quant_method", default=None) == "compressed-tensors":
        groups = qc.obj("config_groups") or Fields({}, qc.file)
        if qc.string("format", default=None) == PACK_QUANTIZED or any(
            g.string("format", default=None) == PACK_QUANTIZED for _, g in groups.objects()
        ):
            return _detect_pack_quantized(reader, qc, expert_keys["weight"])
        return _detect_int_quantized(reader, qc, expert_keys["weight"].rsplit(".", 1)[0])
    desc_name = next((n for n in DESCRIPTION_NAMES if reader.has(n)), None)
    if desc_name is None:
        raise CheckpointError(
            f"{reader.folder}: no quantization metadata (expected {' or '.join(DESCRIPTION_NAMES)}, "
            "or config.json quantization_config with quant_method compressed-tensors)"
        )
    where = reader.folder / desc_name
    desc = Fields(reader.json(desc_name), where)
    for key, value in desc.data.items():
        if key not in DESCRIPTION_FIELDS and not isinstance(value, str):
            raise desc.fail(key, "a quantization type string", value)
    desc.string("model_quant_type", default=None)
    desc.obj("quantfw")
    version = desc.string("version", default=None)
    declared = desc.integer("group_size", 0, MAX_GROUP, default=None)
    wkey = expert_keys["weight"]
    if wkey not in desc:
        raise CheckpointError(f"{where}: no entry for routed-expert tensor '{wkey}'")
    qtype = desc.string(wkey, EXPERT_TYPES)
    for key in experts:
        if key in desc and desc.data[key] != qtype:
            raise desc.fail(
                key, f"{qtype} like '{wkey}' (one type for every routed expert of a layer)", desc.data[key]
            )
    if qtype == "W8A8_DYNAMIC":
        return ["scheme=w8a8", "format=msmodelslim"]
    if version is not None and version != PACKED_INT4_VERSION:
        raise desc.fail(
            "version", f"'{PACKED_INT4_VERSION}' for W4A8_DYNAMIC (packed int4 + scale_bias)", version
        )
    second = expert_keys["weight_scale_second"]
    group = 0
    if second in reader:
        k, cols = reader.info(wkey).shape[-1], reader.info(second).shape[-1]
        group = k // cols if cols else 0
        if not group or group * cols != k:
            raise CheckpointError(
                f"{reader.folder}: '{second}' {list(reader.info(second).shape)} does not split K={k} into equal groups"
            )
    if declared not in (None, group):
        raise CheckpointError(
            f"{where}: group_size {declared} disagrees with the tensors (group {group} from "
            f"'{second}'{'' if group else ' absent: per channel'}, K={reader.info(wkey).shape[-1]})"
        )
    clip = expert_keys["alpha"] in reader
    return [
        "scheme=w4a8",
        f"scheme.group_size={group}",
        f"scheme.activation_use_clip={str(clip).lower()}",
        "format=msmodelslim",
    ]
