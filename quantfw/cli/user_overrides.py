"""The overrides the user typed on the command line (so detected settings stay defaults they can override)."""

from __future__ import annotations

# Keys the checkpoint commands set themselves; everything else the user typed is passed on.
OWN_KEYS = ("input", "output", "checkpoint", "reference", "out", "tokens", "overwrite", "layer", "seed")


def recipe_and_overrides() -> tuple[str, list[str]]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "default", []
    hc = HydraConfig.get()
    task = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") not in OWN_KEYS]
    return hc.job.config_name, task
