"""Serving-engine profiles (conf/engine/*.yaml): what each consumer loads and computes.

- `profile`: load and validate a profile by its registered name.
- `facts`: the facts of a quantized checkpoint that the rules talk about.
- `report`: run a profile's rules on a checkpoint (`quantfw check ... engine=NAME`).
- `plan`: the scheme-flag overrides that make quantfw compute what the engine computes
  (`quantfw eval ... engine=NAME`, `load_engine_layer`).
- `commands`: the `quantize` / `check` side of `engine=NAME`.
"""

from quantfw.engines.plan import load_engine_layer, plan_overrides
from quantfw.engines.profile import EngineProfile, available, load_profile
from quantfw.engines.report import Finding, engine_report

__all__ = [
    "EngineProfile",
    "Finding",
    "available",
    "engine_report",
    "load_engine_layer",
    "load_profile",
    "plan_overrides",
]
