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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from quantfw.errors import CheckpointError
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


def _write_compressed_tensors(
    out: Path, config: dict, scheme: Scheme, types: Mapping[str, str], prov: dict
) -> None:
    f = scheme.flags
    acts = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}
    weights = {"num_bits": f["weight_bits"], "type": "int", "symmetric": True, "dynamic": False}
    weights.update(
        {"strategy": "group", "group_size": f["group_size"]}
        if f.get("group_size")
        else {"strategy": "channel"}
    )
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
            "group_1": {
                "targets": ["MoEGMM"],
                "weights": weights,
                "input_activations": acts,
                "activation_use_clip": bool(f.get("activation_use_clip")),
            },
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


def _targets_module(targets, name: str) -> bool:
    """compressed-tensors target matching for one Linear module: class name, exact name or `re:`."""
    for t in targets or ():
        if t == "Linear" or t == name or (t.startswith("re:") and re.match(t[3:], name)):
            return True
    return False


def _detect_pack_quantized(reader, qc: Mapping[str, Any], weight_key: str) -> list[str]:
    """llm-compressor int4 "pack-quantized" -> scheme w4a8 (group size from the config group
    that targets the routed experts) read through format pack_quantized."""
    where = reader.folder / "config.json"
    module = weight_key.rsplit(".", 1)[0]
    if any(
        i == module or (isinstance(i, str) and i.startswith("re:") and re.match(i[3:], module))
        for i in qc.get("ignore") or ()
    ):
        raise CheckpointError(
            f"{where}: quantization_config ignores routed expert {module} (it is not quantized)"
        )
    groups = [
        g for g in (qc.get("config_groups") or {}).values() if _targets_module(g.get("targets"), module)
    ]
    if not groups:
        raise CheckpointError(f"{where}: no quantization_config group targets routed expert {module}")
    g = groups[0]
    fmt = g.get("format") or qc.get("format")
    w = g.get("weights") or {}
    facts = (fmt, w.get("num_bits"), w.get("type", "int"), w.get("symmetric"), w.get("strategy"))
    if facts[:4] != (PACK_QUANTIZED, 4, "int", True) or facts[4] not in ("group", "channel"):
        raise CheckpointError(
            f"{where}: expert group {g.get('targets')} has format={fmt} num_bits={w.get('num_bits')} "
            f"type={w.get('type')} symmetric={w.get('symmetric')} strategy={w.get('strategy')} "
            "(readable: pack-quantized, 4-bit int, symmetric, group or channel)"
        )
    acts = g.get("input_activations")
    if acts and (acts.get("num_bits"), acts.get("type", "int"), acts.get("dynamic")) != (8, "int", True):
        raise CheckpointError(
            f"{where}: expert input_activations {dict(acts)} (W4A8 runs int8 dynamic per-token activations)"
        )
    group = int(w.get("group_size") or 0) if w["strategy"] == "group" else 0
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


def detect(reader, expert_keys: Mapping[str, str]) -> list[str]:
    """Recipe overrides (scheme, format, flags) that match the checkpoint.

    `expert_keys` maps suffix -> a full key of one routed expert's gate projection, plus 'alpha'
    -> its down_proj.alpha key (present or not). Per-tensor facts decide, not global fields.
    """
    config = reader.config()
    qc = config.get("quantization_config")
    if isinstance(qc, Mapping) and qc.get("quant_method") == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        if qc.get("format") == PACK_QUANTIZED or any(
            isinstance(g, Mapping) and g.get("format") == PACK_QUANTIZED for g in groups.values()
        ):
            return _detect_pack_quantized(reader, qc, expert_keys["weight"])
        moe = [g for g in groups.values() if "MoEGMM" in (g.get("targets") or [])]
        if not moe:
            raise CheckpointError(
                f"{reader.folder / 'config.json'}: quantization_config has no config group targeting MoEGMM "
                f"(found targets: {[g.get('targets') for g in groups.values()]})"
            )
        g = moe[0]
        bits = (g.get("weights") or {}).get("num_bits")
        if bits == 8:
            return ["scheme=w8a8", "format=compressed_tensors"]
        if bits == 4:
            clip = bool(g.get("activation_use_clip", False))
            return [
                "scheme=w4a8_clip",
                f"scheme.activation_use_clip={str(clip).lower()}",
                "format=compressed_tensors",
            ]
        raise CheckpointError(
            f"{reader.folder / 'config.json'}: MoEGMM group weights num_bits={bits} (expected 4 or 8)"
        )
    desc_name = next((n for n in DESCRIPTION_NAMES if (reader.folder / n).is_file()), None)
    if desc_name is None:
        raise CheckpointError(
            f"{reader.folder}: no quantization metadata (expected {' or '.join(DESCRIPTION_NAMES)}, "
            "or config.json quantization_config with quant_method compressed-tensors)"
        )
    desc = reader.json(desc_name)
    wkey = expert_keys["weight"]
    qtype = desc.get(wkey)
    if qtype is None:
        raise CheckpointError(f"{reader.folder / desc_name}: no entry for routed-expert tensor '{wkey}'")
    if qtype == "W8A8_DYNAMIC":
        return ["scheme=w8a8", "format=msmodelslim"]
    if qtype != "W4A8_DYNAMIC":
        raise CheckpointError(
            f"{reader.folder / desc_name}: '{wkey}' is {qtype} (expected W8A8_DYNAMIC or W4A8_DYNAMIC)"
        )
    second = expert_keys["weight_scale_second"]
    group = 0
    if second in reader:
        k = reader.info(wkey).shape[-1]
        group = k // reader.info(second).shape[-1]
        declared = desc.get("group_size")
        if declared not in (None, group):
            raise CheckpointError(
                f"{reader.folder / desc_name}: group_size {declared} disagrees with '{second}' {list(reader.info(second).shape)} (K={k})"
            )
    clip = expert_keys["alpha"] in reader
    return [
        "scheme=w4a8",
        f"scheme.group_size={group}",
        f"scheme.activation_use_clip={str(clip).lower()}",
        "format=msmodelslim",
    ]
