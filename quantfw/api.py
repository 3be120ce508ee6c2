"""The Python API: build the generic MoE layer from a recipe or a composed config."""

from __future__ import annotations

from collections.abc import Sequence

from quantfw.build import build_layer, components, layer_dims
from quantfw.config.compose import compose
from quantfw.io.loader import from_checkpoint
from quantfw.moe.layer import MoELayer

__all__ = ["build_from_recipe", "build_layer", "components", "from_checkpoint", "layer_dims"]


def build_from_recipe(recipe: str = "default", overrides: Sequence[str] = ()) -> MoELayer:
    return build_layer(compose(recipe, overrides))
