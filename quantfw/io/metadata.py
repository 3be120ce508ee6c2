"""Checkpoint metadata, driven by each format's `metadata:` declaration (conf/format/*.yaml).

A format declares its metadata `style` (a name in `STYLES`, io/styles/base.py, entry-point group
`quantfw.metadata_styles`) and the style's parameters. The style writes the files and, on
detection, reports FLAGS (bits, group size, whether optional parameters are in use, observer
provenance) read from the file; the scheme is then the declared one whose flags match (no style
names a scheme). Built-in styles: quantfw/io/styles/. Per-tensor facts decide, never a global
field alone (spec section 8).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantfw.config.declared import declarations
from quantfw.errors import CheckpointError
from quantfw.io.experts import ROLE_OF
from quantfw.io.styles.base import (
    FLOAT,
    STYLES,
    Detected,
    MetadataStyle,
    Probe,
    dump,
    expert_type,
    quant_type,
    style_of,
    styles,
)
from quantfw.schemes.scheme import Scheme, optional_params

# The style vocabulary lives in io/styles/base.py (the styles import it); named here too for the
# writer, the loader and the quantizer, which only ever talk to this module.
__all__ = [
    "FLOAT",
    "STYLES",
    "VERSION",
    "Detected",
    "MetadataStyle",
    "Probe",
    "detect",
    "dump",
    "expert_type",
    "produced_by_quantfw",
    "provenance",
    "quant_type",
    "quantfw_block",
    "scheme_overrides",
    "style_of",
    "styles",
    "write",
]

VERSION = "0.1.0"


def provenance(scheme: Scheme, format_name: str, alpha_method: str | None) -> dict[str, Any]:
    return {
        "producer": "quantfw",
        "version": VERSION,
        "scheme": scheme.name,
        "flags": dict(sorted(scheme.flags.items())),
        "format": format_name,
        "alpha_method": alpha_method,
    }


def _format_decls() -> list[tuple[str, dict]]:
    """(format name, metadata declaration) of every declared format (quantfw's and installed
    plugins' conf), in detection order."""
    decls = [(name, d["metadata"]) for name, d in declarations("format").items()]
    return sorted(decls, key=lambda nd: (style_of(nd[1], nd[0]).priority, nd[0]))


def quantfw_block(folder: Path) -> dict | None:
    """The quantfw provenance block of the checkpoint in `folder`, whichever style wrote it."""
    for name, decl in _format_decls():
        block = style_of(decl, name).quantfw_block(folder, decl)
        if block is not None:
            return block
    return None


def produced_by_quantfw(folder: Path) -> bool:
    """Whether `folder` holds a checkpoint quantfw wrote (its metadata carries the quantfw block)."""
    block = quantfw_block(folder)
    return block is not None and block.get("producer") == "quantfw"


def write(
    fmt,
    out: Path,
    config: dict,
    scheme: Scheme,
    types: Mapping[str, str],
    prov: dict,
    linear: Scheme | None = None,
) -> None:
    """Write `fmt`'s metadata files into `out` as its declaration says (`linear`: the scheme of
    the non-expert linears written, None when there are none)."""
    style_of(fmt.metadata_decl, fmt.where).write(out, config, scheme, types, prov, fmt.metadata_decl, linear)


# -------------------------------------------------------------------------------------- detection


def detect(reader, probe: Probe) -> list[str]:
    """Recipe overrides (scheme, format, flags) that match the checkpoint's metadata."""
    decls = _format_decls()
    by_style: dict[str, list[dict]] = {}
    for _, decl in decls:
        by_style.setdefault(decl["style"], []).append(decl)
    for name, decl in decls:
        style = style_of(decl, name)
        if style.claims(reader, decl, by_style[decl["style"]]):
            found = style.detect(reader, decl, probe)
            return [*scheme_overrides(reader, found, probe), f"format={name}", *found.overrides]
    expected = sorted({f for _, d in decls for f in style_of(d).files(d)})
    raise CheckpointError(
        f"{reader.folder}: no quantization metadata (expected {' or '.join(expected)} as a declared "
        "format writes it: conf/format/*.yaml metadata)"
    )


def _value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def scheme_overrides(reader, found: Detected, probe: Probe) -> list[str]:
    """`scheme=NAME` of the declared scheme whose flags match `found` best, plus `scheme.K=V` for
    each flag that differs. A scheme must agree on the defining (first) flag; then matching
    optional-parameter flags (they change the runtime layout) weigh more than the others."""
    first, *rest = found.flags.items()
    best = None
    for name, data in declarations("scheme").items():
        if data.get(first[0]) != first[1]:
            continue
        facts = [first]
        for pname, opt in optional_params(data.get("runtime") or {}).items():
            in_use = found.optional
            if in_use is None:
                projs = [p for p, role in ROLE_OF.items() if role in opt.roles]
                in_use = any(probe.key(pname, proj) in reader for proj in projs)
            facts.append((opt.flag, in_use))
        facts += rest
        score = tuple(data.get(k) == v for k, v in facts)
        if best is None or score > best[0]:
            best = (score, name, [f"scheme.{k}={_value(v)}" for k, v in facts if data.get(k) != v])
    if best is None:
        raise CheckpointError(
            f"{reader.folder}: its metadata says {first[0]}={first[1]}; no declared scheme has it "
            f"(conf/scheme: {', '.join(declarations('scheme'))})"
        )
    return [f"scheme={best[1]}", *best[2]]
