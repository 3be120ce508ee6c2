"""msModelSlim metadata: `quant_model_description.json` (per-tensor type, "version", "group_size",
"model_quant_type", spec sections 3 and 8) next to the original config.json.

Declaration (conf/format/*.yaml `metadata:`): `files` (the first is written, any is read),
`shard_base` and `weight_bits` (the experts' per-tensor types it reads, in that order). Detection reads the routed experts' per-tensor types, never model_quant_type alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantfw.errors import CheckpointError
from quantfw.io.fields import Fields
from quantfw.io.styles.base import STYLES, Detected, MetadataStyle, Probe, dump, expert_type, quant_type
from quantfw.schemes.scheme import Scheme

MAX_GROUP = 1 << 16
PACKED_INT4_VERSION = "1.0.0"  # description version of packed int4 + scale_bias
FIELDS = ("version", "group_size", "model_quant_type", "quantfw")
TYPE = re.compile(r"W(\d+)A8_DYNAMIC")


class MsModelSlim(MetadataStyle):
    name = "msmodelslim"
    priority = 1  # a compressed-tensors quantization_config in config.json wins

    def files(self, decl: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(decl["files"])

    def quantfw_block(self, folder: Path, decl: Mapping[str, Any]) -> dict | None:
        for name in self.files(decl):
            path = folder / name
            if not path.is_file() or path.stat().st_size > 1 << 26:
                continue
            try:
                block = json.loads(path.read_text()).get("quantfw")
            except (OSError, ValueError, AttributeError):
                continue
            return block if isinstance(block, dict) else None
        return None

    def claims(self, reader, decl, declared) -> bool:
        return any(reader.has(n) for n in self.files(decl))

    def write(
        self, out: Path, config: dict, scheme: Scheme, types: Mapping[str, str], prov: dict, decl, linear=None
    ) -> None:
        desc: dict[str, Any] = dict(sorted(types.items()))
        desc["version"] = PACKED_INT4_VERSION  # packed int4 + scale_bias present (spec section 3)
        desc["group_size"] = scheme.flags.get("group_size", 0)
        # The global type is informative only; readers decide per tensor (spec section 8).
        desc["model_quant_type"] = expert_type(scheme)
        desc["quantfw"] = prov
        dump(out / self.files(decl)[0], desc)
        # The input's own quantization_config (an FP8 release's) does not describe this output.
        dump(out / "config.json", {k: v for k, v in config.items() if k != "quantization_config"})

    def detect(self, reader, decl, probe: Probe) -> Detected:
        name = next(n for n in self.files(decl) if reader.has(n))
        where = reader.folder / name
        desc = Fields(reader.json(name), where)
        for key, value in desc.data.items():
            if key not in FIELDS and not isinstance(value, str):
                raise desc.fail(key, "a quantization type string", value)
        desc.string("model_quant_type", default=None)
        desc.obj("quantfw")
        version = desc.string("version", default=None)
        declared = desc.integer("group_size", 0, MAX_GROUP, default=None)
        wkey = probe.key("weight")
        if wkey not in desc:
            raise CheckpointError(f"{where}: no entry for routed-expert tensor '{wkey}'")
        qtype = desc.string(wkey, [quant_type(b) for b in decl["weight_bits"]])
        for key in probe.experts:
            if key in desc and desc.data[key] != qtype:
                raise desc.fail(
                    key, f"{qtype} like '{wkey}' (one type for every routed expert of a layer)", desc.data[key]
                )
        bits = int(TYPE.fullmatch(qtype).group(1))
        if bits == 8:
            return Detected({"weight_bits": bits})
        if version is not None and version != PACKED_INT4_VERSION:
            raise desc.fail(
                "version", f"'{PACKED_INT4_VERSION}' for {qtype} (packed int4 + scale_bias)", version
            )
        second = probe.key("weight_scale_second")
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
        # Whether optional parameters are in use: their tensors' presence says (optional=None).
        return Detected({"weight_bits": bits, "group_size": group})


STYLES.add(MsModelSlim.name, MsModelSlim())
