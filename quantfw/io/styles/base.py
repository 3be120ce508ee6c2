"""What a metadata style is and where styles are registered: `MetadataStyle`, the facts it reports
(`Detected`), where detection looks (`Probe`) and the `STYLES` registry (entry-point group
`quantfw.metadata_styles`). The built-in styles of this package import this module and register
themselves; the registry imports them by name on first lookup, so nothing here imports a style
and io/metadata.py, which drives writing and detection, sits above both.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantfw.registry import Registry
from quantfw.schemes.scheme import Scheme

FLOAT = "FLOAT"
BUILTIN_STYLES = ("quantfw.io.styles.compressed_tensors", "quantfw.io.styles.msmodelslim")


def quant_type(bits: int) -> str:
    """The per-tensor type string of a tensor quantized to `bits` with int8 dynamic activations
    (msModelSlim's vocabulary, also the type of every tensor in the resume records)."""
    return f"W{bits}A8_DYNAMIC"


def expert_type(scheme: Scheme) -> str:
    return quant_type(scheme.flags["weight_bits"])


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


STYLES: Registry[MetadataStyle] = Registry("metadata style", "metadata_styles", builtin=BUILTIN_STYLES)


def styles() -> Registry[MetadataStyle]:
    """The registry with the built-in and plugin styles loaded (a direct `add` then sees them)."""
    STYLES.load_plugins()
    return STYLES


def style_of(decl: Mapping[str, Any], where: str = "") -> MetadataStyle:
    return STYLES.get(decl.get("style", ""), f"{where} metadata.style".strip())
