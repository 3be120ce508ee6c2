"""This process's place in a torch.distributed job (gloo on CPU under torchrun), or a lone process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    """Rank and world of this process; collectives are no-ops for a single process."""

    rank: int = 0
    world: int = 1
    owned: bool = False  # this object created the process group, so it tears it down

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("gloo")
        return cls(dist.get_rank(), dist.get_world_size(), owned)

    def close(self) -> None:
        """Destroy a group we created: gloo's threads left to interpreter exit can abort the
        process ("terminate called without an active exception") after the work is done."""
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def union(self, flags: list[bool]) -> list[bool]:
        """Element-wise OR of a per-item flag list over all ranks."""
        if self.world == 1:
            return flags
        import torch.distributed as dist

        t = torch.tensor([int(f) for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def any_failed(self, failed: bool) -> bool:
        if self.world == 1:
            return failed
        import torch.distributed as dist

        flag = torch.tensor([int(failed)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
