"""Which process holds which routed experts: one declaration drives the loader, the calibration
and the expert-parallel layer.

Default: contiguous blocks (rank r holds experts [r*E/W, (r+1)*E/W), the first E % W ranks one
more). Or an explicit list per rank from the recipe (`placement: [[0, 1, 5], [2, 3, 4, 5]]`):
EPLB-style placements, where a hot expert may sit on several ranks. Every expert must be placed;
the first rank listing an expert is its primary: the only one that writes its tensors and adds
its contribution during calibration, so redundant copies never count twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from quantfw.errors import ConfigError


@dataclass(frozen=True)
class Placement:
    num_experts: int
    experts_of: tuple[tuple[int, ...], ...]  # per rank, the experts it holds (sorted, unique)

    @property
    def world(self) -> int:
        return len(self.experts_of)

    @classmethod
    def contiguous(cls, num_experts: int, world: int) -> Placement:
        if world < 1:
            raise ConfigError(f"placement: world size must be >= 1, got {world}")
        base, extra = divmod(num_experts, world)
        out, start = [], 0
        for r in range(world):
            n = base + (1 if r < extra else 0)
            out.append(tuple(range(start, start + n)))
            start += n
        return cls(num_experts, tuple(out))

    @classmethod
    def declared(cls, lists: Sequence[Sequence[int]], num_experts: int, world: int) -> Placement:
        where = "placement"
        if not isinstance(lists, Sequence) or isinstance(lists, str | bytes):
            raise ConfigError(f"{where}: expected one list of expert ids per rank, got {type(lists).__name__}")
        if len(lists) != world:
            raise ConfigError(f"{where}: {len(lists)} rank lists for a world of {world} processes")
        ranks = []
        for r, experts in enumerate(lists):
            if not isinstance(experts, Sequence) or isinstance(experts, str | bytes):
                raise ConfigError(f"{where}[{r}]: expected a list of expert ids")
            ids = []
            for e in experts:
                if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < num_experts:
                    raise ConfigError(f"{where}[{r}]: expert id {e!r} is not in [0, {num_experts})")
                ids.append(e)
            if len(set(ids)) != len(ids):
                raise ConfigError(f"{where}[{r}]: an expert is listed twice on the same rank")
            ranks.append(tuple(sorted(ids)))
        missing = sorted(set(range(num_experts)) - {e for r in ranks for e in r})
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise ConfigError(f"{where}: experts {shown} are placed on no rank")
        return cls(num_experts, tuple(ranks))

    @classmethod
    def from_config(cls, declared, num_experts: int, world: int) -> Placement:
        """`declared` is the recipe's `placement` value: null means contiguous blocks."""
        if declared is None:
            return cls.contiguous(num_experts, world)
        return cls.declared(declared, num_experts, world)

    def local(self, rank: int) -> tuple[int, ...]:
        return self.experts_of[rank]

    def primary(self, expert: int) -> int:
        """The first rank holding `expert`."""
        for r, experts in enumerate(self.experts_of):
            if expert in experts:
                return r
        raise KeyError(expert)

    def primaries(self, rank: int) -> tuple[int, ...]:
        """The experts whose primary copy is on `rank`."""
        return tuple(e for e in self.experts_of[rank] if self.primary(e) == rank)
