"""compressed-tensors metadata: config.json `quantization_config` (spec section 4, and 1.6 for
llm-compressor's pack-quantized).

Declaration (conf/format/*.yaml `metadata:`): `format` (the compressed-tensors format value it
reads and writes), `experts` (how the config group of the routed experts is found: a target
class such as MoEGMM, or `module` for a group targeting the expert module by name or `re:`),
`weight_bits` (the expert num_bits it reads and writes), `default: true` on the declaration that reads a file whose format value no declaration names,
`shard_base`, `linears_target` (the class of the group written for non-expert linears), and
`clip_key` (the group key that says whether its activations are clipped, spec section 4; none:
the format holds no clip).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantfw.errors import CheckpointError
from quantfw.io.fields import Fields
from quantfw.io.styles.base import FLOAT, STYLES, Detected, MetadataStyle, Probe, dump
from quantfw.schemes.scheme import Scheme

METHOD = "compressed-tensors"
STRATEGIES = ("channel", "group")  # weight strategies of the routed experts that can be read
MAX_GROUP = 1 << 16
MODULE = "module"  # `experts: module`: the group that targets the expert module itself
ACTIVATIONS = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}


def quantization_config(reader) -> Fields | None:
    """config.json's quantization_config (an object, or absent)."""
    return Fields(reader.config(), reader.folder / "config.json").obj("quantization_config")


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


def _weights(bits: int, group_size: int) -> dict[str, Any]:
    w = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False}
    w.update({"strategy": "group", "group_size": group_size} if group_size else {"strategy": "channel"})
    return w


def _clip_entry(decl: Mapping, clips: bool) -> dict[str, bool]:
    """The group's clip key and value, where the format declares one."""
    return {decl["clip_key"]: clips} if decl.get("clip_key") else {}


def _layer_groups(prov: dict, decl: Mapping) -> dict[str, Any]:
    """One config group per scheme of the recipe's per-layer choices (provenance `layers`),
    targeting the routed experts of its layers by `re:` module name (group_1 holds the others)."""
    by_scheme: dict[str, tuple[dict, bool, list[str]]] = {}
    for layer, choice in (prov.get("layers") or {}).items():
        if choice.get("applies") != "routed experts":
            continue
        entry = by_scheme.setdefault(choice["scheme"], (choice["flags"], bool(choice.get("clips")), []))
        entry[2].append(str(layer))
    return {
        f"group_{i + 2}": {
            "targets": [rf"re:.*layers\.({'|'.join(layers)})\.(.*\.)?experts\..*"],
            "weights": _weights(flags["weight_bits"], flags.get("group_size", 0)),
            "input_activations": ACTIVATIONS,
            **_clip_entry(decl, clips),
        }
        for i, (flags, clips, layers) in enumerate(by_scheme.values())
    }


class CompressedTensors(MetadataStyle):
    name = "compressed_tensors"
    priority = 0

    def files(self, decl: Mapping[str, Any]) -> tuple[str, ...]:
        return ("config.json",)

    def quantfw_block(self, folder: Path, decl: Mapping[str, Any]) -> dict | None:
        path = folder / "config.json"
        if not path.is_file() or path.stat().st_size > 1 << 26:
            return None
        try:
            block = (json.loads(path.read_text()).get("quantization_config") or {}).get("quantfw")
        except (OSError, ValueError, AttributeError):
            return None
        return block if isinstance(block, dict) else None

    def claims(self, reader, decl, declared) -> bool:
        qc = quantization_config(reader)
        if qc is None or qc.string("quant_method", default=None) != METHOD:
            return False
        groups = qc.obj("config_groups") or Fields({}, qc.file)
        values = {qc.string("format", default=None)} | {
            g.string("format", default=None) for _, g in groups.objects()
        }
        if decl["format"] in values:
            return True
        return bool(decl.get("default")) and not any(d["format"] in values for d in declared)

    def write(
        self, out: Path, config: dict, scheme: Scheme, types: Mapping[str, str], prov: dict, decl, linear=None
    ) -> None:
        # Routed experts are group_1; non-expert linears (`linear`, their scheme) are group_0,
        # claimed only when there are some. Every float `.weight` is listed in `ignore`.
        ignore = sorted(
            k[: -len(".weight")] for k, t in types.items() if t == FLOAT and k.endswith(".weight")
        )
        groups = {}
        for name, target, s in (
            ("group_0", decl.get("linears_target"), linear),
            ("group_1", decl["experts"], scheme),
        ):
            if s is not None:
                groups[name] = {
                    "targets": [target],
                    "weights": _weights(s.flags["weight_bits"], s.flags.get("group_size", 0)),
                    "input_activations": ACTIVATIONS,
                    **_clip_entry(decl, s.clips),
                }
        groups.update(_layer_groups(prov, decl))
        qc = {
            "quant_method": METHOD,
            "format": decl["format"],
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": ignore,
            "quantfw": prov,
        }
        dump(out / "config.json", {**config, "quantization_config": qc})  # replaces the input's, never merged

    def detect(self, reader, decl, probe: Probe) -> Detected:
        qc = quantization_config(reader)
        if decl["experts"] == MODULE:
            return self._module_group(reader, qc, probe, decl)
        return self._class_group(reader, qc, decl, probe.key("weight").rsplit(".", 1)[0])

    def _class_group(self, reader, qc: Fields, decl, module: str) -> Detected:
        """The config group targeting this routed expert `module` by name (a per-layer choice),
        else the group targeting the experts' class (cann-recipes, quantfw: MoEGMM)."""
        where = reader.folder / "config.json"
        target = decl["experts"]
        groups = list((qc.obj("config_groups") or Fields({}, where)).objects())
        named = [
            g
            for _, g in groups
            if _targets_module([t for t in g.strings("targets", []) if t != "Linear"], module)
        ]
        moe = named or [g for _, g in groups if target in g.strings("targets", [])]
        if not moe:
            raise CheckpointError(
                f"{where}: quantization_config has no config group targeting {target} "
                f"(found targets: {[g.raw('targets') for _, g in groups]})"
            )
        g = moe[0]
        bits, group = _weights_group(g, tuple(decl["weight_bits"]))
        _activations(g)
        clip_key = decl.get("clip_key")
        clip = g.boolean(clip_key, default=False) if clip_key else False
        if group:
            # this format stores experts per channel only (its conf/format YAML)
            raise g.obj("weights").fail(
                "strategy", f"channel ({decl['format']} experts are per channel)", "group"
            )
        if bits == 8 and clip:
            raise g.fail(clip_key, "false for 8-bit experts", clip)
        return Detected({"weight_bits": bits, "group_size": group}, optional=clip)

    def _module_group(self, reader, qc: Fields, probe: Probe, decl) -> Detected:
        """llm-compressor int4 pack-quantized: the config group that targets the expert module
        (group size from it); the stored scale's dtype is read from the file."""
        where = reader.folder / "config.json"
        weight_key = probe.key("weight")
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
        readable = decl["weight_bits"]
        if (
            facts[0] != decl["format"]
            or facts[1] not in readable
            or facts[2:4] != ("int", True)
            or facts[4] not in STRATEGIES
        ):
            raise CheckpointError(
                f"{where}: expert group {g.raw('targets')} has format={fmt} num_bits={facts[1]} "
                f"type={facts[2]} symmetric={facts[3]} strategy={facts[4]} "
                f"(readable: {decl['format']}, {'/'.join(map(str, readable))}-bit int, symmetric, group or channel)"
            )
        bits, group = _weights_group(g, tuple(decl["weight_bits"]))
        acts = g.obj("input_activations")
        if acts is not None and (acts.raw("num_bits"), acts.raw("type", "int"), acts.raw("dynamic")) != (
            8,
            "int",
            True,
        ):
            raise CheckpointError(
                f"{where}: expert input_activations {dict(acts.data)} (W4A8 runs int8 dynamic per-token activations)"
            )
        _activations(g)
        scale_key = module + ".weight_scale"
        if scale_key not in reader:
            raise CheckpointError(
                f"{reader.folder}: '{scale_key}' missing ({decl['format']} needs weight_scale)"
            )
        dtype = str(reader.info(scale_key).dtype).removeprefix("torch.")
        # No activation alphas in this format: the optional parameters are not in use.
        return Detected(
            {"weight_bits": bits, "group_size": group},
            optional=False,
            overrides=[f"format.tensors.weight_scale.dtype={dtype}"],
        )


STYLES.add(CompressedTensors.name, CompressedTensors())
