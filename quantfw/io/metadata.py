"""Checkpoint metadata, driven by each format's `metadata:` declaration (conf/format/*.yaml).

A format declares its metadata `style` (a name in `STYLES`, entry-point group
`quantfw.metadata_styles`) and the style's parameters. The style writes the files and, on
detection, reports FLAGS (bits, group size, whether optional parameters are in use, observer
provenance) read from the file; the scheme is then the declared one whose flags match (no style
names a scheme). Built-in styles: quantfw/io/styles/. Per-tensor facts decide, never a global
field alone (spec section 8).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantfw.errors import CheckpointError
from quantfw.io.experts import ROLE_OF
from quantfw.registry import Registry
from quantfw.schemes.scheme import Scheme, optional_params

VERSION = "0.1.0"
FLOAT = "FLOAT"


def quant_type(bits: int) -> str:
    """The per-tensor type string of a tensor quantized to `bits` with int8 dynamic activations
    (msModelSlim's vocabulary, also the type of every tensor in the resume records)."""
    return f"W{bits}A8_DYNAMIC"


def expert_type(scheme: Scheme) -> str:
    return quant_type(scheme.flags["weight_bits"])


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


@dataclass(frozen=True)
class Probe:
    """Where detection looks: `key(suffix, proj)` names expert 0's tensor of the first MoE layer;
    `experts` lists every routed-expert key."""

    key_of: Callable[[str, str], str]
    experts: Sequence[str] = ()
    first_proj: str = "gate"

    def key(self, suffix: str, proj: str | None = None) -> str:
        return self.key_of(proj or self.first_proj, suffix)


@dataclass
class Detected:
    """What a style read from a checkpoint's metadata.

    flags: scheme flags, the defining one first (a matching scheme must agree on it; the others
    become overrides when they differ). optional: whether the file says the scheme's optional
    runtime parameters are in use (None: it does not say; their tensors' presence decides).
    overrides: format keys the file sets (e.g. a stored tensor's dtype)."""

    flags: dict[str, Any]
    optional: bool | None = None
    overrides: list[str] = field(default_factory=list)


class MetadataStyle:
    """One way of writing and reading checkpoint metadata; `decl` is the format's `metadata:`."""

    name = ""
    priority = 0  # lower first, when the metadata of several styles is present

    def files(self, decl: Mapping[str, Any]) -> tuple[str, ...]:
        raise NotImplementedError

    def quantfw_block(self, folder: Path, decl: Mapping[str, Any]) -> dict | None:
        """The quantfw provenance block this style wrote into `folder` (None: none)."""
        raise NotImplementedError

    def claims(self, reader, decl: Mapping[str, Any], declared: Sequence[Mapping[str, Any]]) -> bool:
        """Whether `decl` describes the checkpoint (`declared`: every declaration of this style)."""
        raise NotImplementedError

    def detect(self, reader, decl: Mapping[str, Any], probe: Probe) -> Detected:
        raise NotImplementedError

    def write(
        self,
        out: Path,
        config: dict,
        scheme: Scheme,
        types: Mapping[str, str],
        prov: dict,
        decl: Mapping,
        linear: Scheme | None = None,
    ) -> None:
        raise NotImplementedError


STYLES: Registry[MetadataStyle] = Registry("metadata style", "metadata_styles")


def styles() -> Registry[MetadataStyle]:
    import quantfw.io.styles  # noqa: F401  (registers the built-in styles)

    return STYLES


def style_of(decl: Mapping[str, Any], where: str = "") -> MetadataStyle:
    return styles().get(decl.get("style", ""), f"{where} metadata.style".strip())


def _format_decls() -> list[tuple[str, dict]]:
    """(format name, metadata declaration) of every declared format, in detection order."""
    from quantfw.config.declared import declarations

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
    from quantfw.config.declared import declarations

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
