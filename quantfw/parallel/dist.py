"""This process's place in a torch.distributed job (gloo on CPU under torchrun), or a lone process.

Every collective runs under the group's timeout (`dist_timeout_s`, set at init), so a rank that
stops answering ends the others in bounded time; a peer that died or timed out surfaces as one
`DistributedError` line naming this rank and what it was waiting for. `agree` is how a rank's own
failure reaches every rank: each one says whether it failed, and all raise the first failure.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from quantfw.errors import QuantfwError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0  # recipe dist_timeout_s: longer than the longest step one rank does alone


def init_gloo(timeout: timedelta) -> None:
    """Create the gloo world group. torch.distributed.fsdp (pulled in by transformers' model code)
    binds `dist.group.WORLD` as a default argument at import; imported after the group exists, it
    keeps the group alive past destroy_process_group, and gloo's worker threads then die at
    interpreter exit taking the GIL ("terminate called without an active exception", SIGABRT).
    Imported first, it binds None."""
    import torch.distributed as dist
    import torch.distributed.fsdp  # noqa: F401

    dist.init_process_group("gloo", timeout=timeout)


class DistributedError(QuantfwError):
    """A rank failed or the group broke; `resumable` when no rank blamed its input (a rank died,
    timed out or was interrupted), so the partial state is worth keeping."""

    def __init__(self, message: str, resumable: bool = False):
        super().__init__(message)
        self.resumable = resumable


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class Dist:
    """Rank and world of this process; collectives are no-ops for a single process."""

    rank: int = 0
    world: int = 1
    owned: bool = False  # this object created the process group, so it tears it down

    @classmethod
    def from_env(cls, timeout_s: float | None = None) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        owned = not dist.is_initialized()
        if owned:
            seconds = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
            try:
                init_gloo(timedelta(seconds=seconds))
            except (RuntimeError, ValueError) as e:
                rank = os.environ.get("RANK", "?")
                raise DistributedError(
                    f"rank {rank}: cannot join the torch.distributed group of {world} ({_first_line(e)})",
                    resumable=True,
                ) from None
        return cls(dist.get_rank(), dist.get_world_size(), owned)

    def close(self) -> None:
        """Destroy a group we created, so gloo's threads are joined before interpreter exit."""
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """A collective; a broken group (dead peer, timeout) becomes one DistributedError line."""
        try:
            return fn()
        except RuntimeError as e:
            raise DistributedError(
                f"rank {self.rank}: lost the torch.distributed group during {what} "
                f"(another rank died or exceeded dist_timeout_s): {_first_line(e)}",
                resumable=True,
            ) from None

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            self._call("barrier", dist.barrier)

    def union(self, flags: list[bool]) -> list[bool]:
        """Element-wise OR of a per-item flag list over all ranks."""
        if self.world == 1:
            return flags
        import torch.distributed as dist

        t = torch.tensor([int(f) for f in flags])
        self._call("a flag exchange", lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX))
        return [bool(v) for v in t.tolist()]

    def any_failed(self, failed: bool) -> bool:
        return self.union([failed])[0]

    def broadcast(self, obj: Any, what: str = "a broadcast from rank 0") -> Any:
        """Rank 0's `obj` on every rank (pickled: tensors keep their exact bits)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        self._call(what, lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def gather(self, obj: Any, what: str = "a gather to rank 0", dst: int = 0) -> list[Any] | None:
        """Every rank's `obj` in rank order on rank `dst`; None elsewhere."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.rank == dst else None
        self._call(what, lambda: dist.gather_object(obj, out, dst=dst))
        return out

    def agree(self, error: BaseException | None, what: str) -> None:
        """Every rank learns whether any rank failed `what`; if one did, all raise: a rank whose
        failure is a bug re-raises it (keeping its traceback), every other rank raises one line
        naming the first failing rank and its cause."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        mine = None
        if error is not None:
            expected = isinstance(error, QuantfwError)
            line = _first_line(error) if expected else f"{type(error).__name__}: {_first_line(error)}"
            mine = (expected and not getattr(error, "resumable", False), line)
        seen: list[Any] = [None] * self.world
        self._call(what, lambda: dist.all_gather_object(seen, mine))
        failed = [(r, s) for r, s in enumerate(seen) if s is not None]
        if not failed:
            return
        if error is not None and not isinstance(error, QuantfwError):
            raise error
        r, (bad_input, line) = failed[0]
        text = line if line.startswith("rank ") else f"rank {r} failed during {what}: {line}"
        raise DistributedError(text, resumable=not bad_input) from None

    def run(self, what: str, fn: Callable[[], T], only_rank0: bool = False) -> T | None:
        """fn() on every rank (or on rank 0 alone), then `agree` on the outcome."""
        if self.world == 1:
            return fn()
        result, error = None, None
        if not only_rank0 or self.rank == 0:
            try:
                result = fn()
            except Exception as e:  # reported to every rank before anyone raises
                error = e
        self.agree(error, what)
        return result
