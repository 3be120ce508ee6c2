"""Composing a variant of the running recipe (same recipe, extra overrides) from inside a command."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from omegaconf import DictConfig


def running_config_dirs() -> list[str]:
    """The running command's config folders (--config-dir, hydra.searchpath), if inside one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    sources = HydraConfig.get().runtime.config_sources
    return sorted({s.path for s in sources if s.schema == "file" and s.provider != "hydra"})


def compose_variant(extra: Sequence[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from quantfw.config.compose import compose, validate

    if GlobalHydra.instance().is_initialized() and HydraConfig.initialized():
        hc = HydraConfig.get()
        # Keep the search path, drop the run's own choices of the groups the variant sets.
        keys = {o.split("=", 1)[0].lstrip("+~") for o in extra}

        def replaced(o: str) -> bool:
            k = o.split("=", 1)[0].lstrip("+~")
            return any(k == g or k.startswith(g + ".") for g in keys)

        base = [o for o in hc.overrides.task if not replaced(o)]
        searchpath = [o for o in hc.overrides.hydra if o.startswith("hydra.searchpath")]
        cfg = hydra_compose(config_name=hc.job.config_name, overrides=[*base, *extra, *searchpath])
        validate(cfg)
        return cfg
    return compose("default", extra)


@contextmanager
def running_hydra_kept() -> Iterator[None]:
    """Compose or run another command's config inside a running command: compose() clears
    Hydra's global state, which the running command's Hydra app still owns."""
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    running = gh.hydra if gh.is_initialized() else None
    try:
        yield
    finally:
        if running is not None and not GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().initialize(running)
