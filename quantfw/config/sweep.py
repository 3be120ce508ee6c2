"""The jobs of a `--multirun`, expanded as Hydra's basic sweeper will, so each is checked first."""

from __future__ import annotations

import math
from collections.abc import Sequence

from quantfw.errors import ConfigError

MAX_JOBS = 1000  # every job is composed and checked before the first runs


def parse_overrides(overrides: Sequence[str]) -> list:
    """Hydra's own parse of command-line overrides; a syntax error is one line naming the override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(task overrides, hydra overrides), as Hydra files them under hydra.overrides."""
    parsed = parse_overrides(overrides)
    task = [o.input_line for o in parsed if not o.is_hydra_override()]
    return task, [o.input_line for o in parsed if o.is_hydra_override()]


def sweep_jobs(task_overrides: Sequence[str]) -> list[list[str]]:
    """The override list of every job: Hydra's basic sweeper's own split (the only sweeper a
    recipe can run with, see hydra_guard), after refusing more than MAX_JOBS. glob() is refused:
    which options it matches depends on Hydra's search path at sweep time, so the check could
    not be sure to see the same jobs."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.types import ValueType

    parsed = parse_overrides(task_overrides)
    for o in parsed:
        if o.value_type == ValueType.GLOB_CHOICE_SWEEP:
            raise ConfigError(
                f"{o.input_line}: glob() sweeps are not supported; list the options (key=a,b,c)"
            )
    sizes = {}
    for o in parsed:
        if o.is_sweep_override() and o.is_discrete_sweep():
            sizes[o.get_key_element()] = len(list(o.sweep_string_iterator()))
    count = math.prod(sizes.values())
    if count > MAX_JOBS:
        raise ConfigError(f"the sweep has {count} jobs (limit {MAX_JOBS}): {', '.join(map(str, sizes))}")
    try:
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception as e:  # interval sweeps and other forms the basic sweeper refuses
        raise ConfigError(f"sweep: {str(e).splitlines()[0]}") from None
    return [job for batch in batches for job in batch]
