"""One decoder layer of a HF checkpoint at a time, with transformers' own classes.

The causal LM is built from config.json on the meta device (no memory), its MoE blocks swapped for
`SwappedMoEBlock`s around an experts module the caller supplies (`quantfw.integrations.hf`), so a
layer's routed experts are never materialised. `layer_inputs` runs the model's own forward over
real input embeddings with every decoder layer replaced by a recorder, which yields exactly the
arguments (attention mask, rotary position embeddings, position ids) the model would pass each
layer. `materialize(i)` reads only layer i's tensors from the shards (FP8 dequantized, fp32) and
`free(i)` sends them back to the meta device.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from quantfw.errors import CheckpointError, ConfigError
from quantfw.io.fp8 import block_size, read_float
from quantfw.io.reader import CheckpointReader

__all__ = ["SUPPORTED_MODEL_TYPES", "DecoderStack", "check_model_type"]

# model_type -> transformers module whose decoder-layer class calibration builds (every model
# conf/model ships plus GLM-4-MoE); `tests/test_layerwise.py` checks each one builds.
SUPPORTED_MODEL_TYPES = {
    "deepseek_v3": "DeepseekV3DecoderLayer",
    "deepseek_v32": "DeepseekV32DecoderLayer",
    "glm4_moe": "Glm4MoeDecoderLayer",
    "mixtral": "MixtralDecoderLayer",
    "qwen3_moe": "Qwen3MoeDecoderLayer",
}
_EMBED_ROWS = 8192  # embedding rows read per slice: the table is never loaded whole


class _StopForward(Exception):
    pass


def check_model_type(config: dict[str, Any], where: str) -> str:
    mtype = str(config.get("model_type", ""))
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{where}: model_type={mtype!r} has no known decoder layer for layer-by-layer calibration "
            f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
        )
    return mtype


def _renamings(model_type: str) -> list[tuple[str, str]]:
    """transformers' own on-disk -> in-memory key renames for this model type (e.g. Mixtral's
    `block_sparse_moe.` -> `mlp.`); the stacking converters concern experts, which are not loaded."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # pragma: no cover - older transformers
        return []
    out = []
    for t in get_checkpoint_conversion_mapping(model_type) or []:
        if isinstance(t, WeightRenaming):
            out += list(zip(t.source_patterns, t.target_patterns, strict=False))
    return out


class DecoderStack:
    """The meta-device model of `folder` with its MoE experts replaced by `experts_factory(layer)`."""

    def __init__(
        self,
        folder: str | Path,
        reader: CheckpointReader,
        experts_factory: Callable[[int], nn.Module],
        mtp: bool = False,
    ):
        """mtp: also build the MTP layers (DeepSeek `num_nextn_predict_layers`) as decoder layers
        after the main ones (`mtp_layers`; their inputs come from `mtp_input`)."""
        from quantfw.integrations.hf import require_transformers, swap_moe_experts
        from quantfw.quantize.routing import mtp_layers

        tf = require_transformers()
        self.reader = reader
        self.folder = Path(folder)
        raw = reader.config()
        self.model_type = check_model_type(raw, str(self.folder / "config.json"))
        try:
            # From the JSON the hardened reader already read: transformers opens no file here.
            fields = {k: v for k, v in raw.items() if k not in ("model_type", "quantization_config")}
            self.mtp_layers = mtp_layers(raw) if mtp else range(0)
            # A config may declare MTP layers its shards do not hold (transformers' own
            # save_pretrained writes none): nothing to calibrate then.
            if self.mtp_layers and not any(
                k.startswith(f"model.layers.{self.mtp_layers.start}.") for k in reader.keys()
            ):
                self.mtp_layers = range(0)
            if len(self.mtp_layers) > 1:
                raise ConfigError(
                    f"{self.folder / 'config.json'}: num_nextn_predict_layers={len(self.mtp_layers)}; "
                    "calibration handles one MTP layer (quantize.mtp=drop leaves them out)"
                )
            if self.mtp_layers:  # the same decoder-layer class, at the MTP layer's index
                fields["num_hidden_layers"] = self.mtp_layers.stop
            config = tf.AutoConfig.for_model(self.model_type, **fields)
        except (OSError, ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{self.folder / 'config.json'}: transformers cannot read it ({first})"
            ) from None
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config  # FP8 releases: weights are dequantized here, not by transformers
        self.config = config
        self.fp8_block = block_size(raw, str(self.folder / "config.json"))
        with torch.device("meta"):
            model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.model = model.eval()
        self.base = getattr(model, model.base_model_prefix)
        self.base.rotary_emb = type(self.base.rotary_emb)(config=config)  # real: computed, not stored
        self.layers = self.base.layers
        self.swap = swap_moe_experts(model, lambda _w13, _w2, layer: experts_factory(layer))
        self.moe_path = {e.layer_index: e.path for e in self.swap.entries}
        names = self._names = {id(m): n for n, m in model.named_modules()}
        self.layer_prefix = names[id(self.layers)]
        self.embed_key = self.disk_key(names[id(self.base.get_input_embeddings())] + ".weight")

    def __len__(self) -> int:
        return len(self.layers)

    # ------------------------------------------------------------------ names on disk

    def disk_key(self, name: str) -> str:
        if not hasattr(self, "_disk"):
            rules = _renamings(self.model_type)
            self._disk = {}
            for k in self.reader.keys():
                mem = k
                for src, dst in rules:
                    mem = re.sub(src, dst, mem)
                self._disk.setdefault(mem, k)
        key = self._disk.get(name)
        if key is None:
            raise CheckpointError(f"{self.reader.folder}: tensor '{name}' (decoder calibration) not found")
        return key

    # ------------------------------------------------------------------ inputs

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings fp32 [*ids.shape, H], reading only the rows the ids use."""
        info = self.reader.info(self.embed_key)
        if info.dtype == torch.float8_e4m3fn:
            return read_float(self.reader, self.embed_key, self.fp8_block).float()[ids]
        flat = ids.reshape(-1)
        out = torch.empty(flat.shape[0], info.shape[1], dtype=torch.float32)
        with safe_open(self.reader.folder / info.shard, framework="pt") as f:
            table = f.get_slice(self.embed_key)
            for start in range(0, info.shape[0], _EMBED_ROWS):
                hit = (flat >= start) & (flat < start + _EMBED_ROWS)
                if hit.any():
                    rows = table[start : start + _EMBED_ROWS]
                    out[hit] = rows[flat[hit] - start].float()
        return out.view(*ids.shape, -1)

    def layer_inputs(self, embeds: torch.Tensor) -> list[tuple[tuple, dict]]:
        """(args, kwargs) the model's forward passes each decoder layer after `embeds` [B, S, H]."""
        seen: list[tuple[tuple, dict]] = []
        last = len(self.layers) - 1

        def recorder(index):
            def forward(hidden, *args, **kwargs):
                seen.append((args, kwargs))
                if index == last:
                    raise _StopForward
                return hidden

            return forward

        for i, layer in enumerate(self.layers):
            layer.forward = recorder(i)
        try:
            with torch.no_grad():
                self.base(inputs_embeds=embeds, use_cache=False)
        except _StopForward:
            pass
        finally:
            for layer in self.layers:
                del layer.forward
        if len(seen) != len(self.layers):
            raise CheckpointError(
                f"{self.folder}: the model forward reached {len(seen)} of {len(self.layers)} decoder layers"
            )
        return seen

    # ------------------------------------------------------------------ one layer

    def moe_block(self, i: int) -> nn.Module | None:
        path = self.moe_path.get(i)
        return None if path is None else self.model.get_submodule(path)

    def materialize(self, i: int) -> nn.Module:
        """Decoder layer i with its own tensors read from the shards (fp32; routed experts excluded)."""
        layer = self.layers[i]
        prefix = f"{self.layer_prefix}.{i}."
        moe = self.moe_path.get(i)
        skip = moe[len(prefix) :] + ".experts." if moe else None  # the caller's experts module
        state = {}
        for name, t in layer.state_dict(keep_vars=True).items():
            if skip and name.startswith(skip):
                continue
            w = read_float(self.reader, self.disk_key(prefix + name), self.fp8_block)
            if tuple(w.shape) != tuple(t.shape):
                raise CheckpointError(
                    f"{self.reader.folder}: tensor '{self.disk_key(prefix + name)}' has shape {list(w.shape)}, "
                    f"expected {list(t.shape)} (config.json)"
                )
            state[name] = w.to(t.dtype) if t.is_floating_point() else w
        layer.load_state_dict(state, assign=True, strict=False)
        tensors = [*layer.named_parameters(), *layer.named_buffers()]
        left = [n for n, t in tensors if t.is_meta and not (skip and n.startswith(skip))]
        if left:
            raise CheckpointError(
                f"{self.folder}: layer {i} tensor '{left[0]}' is neither stored nor computed"
            )
        return layer.eval()

    def mtp_input(self, i: int, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """What MTP layer i sees [B, S-1, H] for token windows `ids` [B, S] and the main model's
        last hidden states [B, S, H] (before its final norm), as DeepSeek-V3 defines it:
        eh_proj(cat(enorm(embed(token t+1)), hnorm(final_norm(h_t)))). The final norm is applied
        because the MTP module takes the hidden states the main model hands its output head."""
        norm_cls, eps = type(self.base.norm), self.config.rms_norm_eps
        prefix = f"{self.layer_prefix}.{i}."

        def norm(key: str, x: torch.Tensor) -> torch.Tensor:
            module = norm_cls(x.shape[-1], eps=eps)
            module.weight = nn.Parameter(read_float(self.reader, key, self.fp8_block).float(), False)
            return module(x)

        final = self.disk_key(self._names[id(self.base.norm)] + ".weight")
        h = norm(self.disk_key(prefix + "hnorm.weight"), norm(final, hidden[:, :-1]))
        e = norm(self.disk_key(prefix + "enorm.weight"), self.embed(ids[:, 1:]))
        proj = read_float(self.reader, self.disk_key(prefix + "eh_proj.weight"), self.fp8_block).float()
        with torch.no_grad():
            return torch.cat([e, h], dim=-1) @ proj.T

    def free(self, i: int) -> None:
        layer, moe = self.layers[i], self.moe_block(i)
        experts = moe.experts if moe is not None else None
        if moe is not None:
            moe.experts = nn.Identity()  # the caller's module keeps its own state
        layer.to_empty(device="meta")
        if moe is not None:
            moe.experts = experts
