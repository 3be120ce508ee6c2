"""The generic MoE layer: one class for every scheme.

It allocates what the format declares, runs the declared post-load pipeline (format load steps,
then backend steps), and executes the scheme's compute plan on a backend's operator table. It has
no branch on a scheme's name or flags: everything scheme-specific arrives as data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from quantfw.backends import Backend
from quantfw.errors import LayoutError
from quantfw.formats.format import Format, check_declared_result
from quantfw.layout.spec import Dims, ParamSpec, conformance_problems
from quantfw.schemes.scheme import Scheme


class MoELayer(torch.nn.Module):
    """Routed experts of one MoE layer: forward(hidden [T,H], topk_weights [T,k], topk_ids [T,k])."""

    def __init__(
        self,
        scheme: Scheme,
        fmt: Format,
        backend: Backend,
        dims: Dims,
        expert_offset: int = 0,
        experts: Sequence[int] | None = None,
    ):
        super().__init__()
        self.scheme, self.format, self.backend, self.dims = scheme, fmt, backend, dims
        # Global ids of the local experts (expert parallel): a contiguous block from expert_offset,
        # or any placement's list; a non-contiguous list routes through a global -> local id table.
        self.experts = (
            tuple(range(expert_offset, expert_offset + dims.E)) if experts is None else tuple(experts)
        )
        if len(self.experts) != dims.E:
            raise LayoutError(f"MoELayer: {len(self.experts)} expert ids for dims.E={dims.E}")
        self.expert_offset = self.experts[0] if self.experts else expert_offset  # global id of local 0
        contiguous = self.experts == tuple(range(self.expert_offset, self.expert_offset + dims.E))
        self._local_of = None if contiguous else local_id_table(self.experts)
        fmt.check_compatible(scheme)
        scheme.check_dims(dims)
        self.loaded_specs: dict[str, ParamSpec] = fmt.loaded_layout(dims, scheme)
        self.runtime_specs: dict[str, ParamSpec] = scheme.runtime_layout(dims)
        self.format_pipeline = fmt.pipeline()
        # Plan-time proof that the format's load steps produce exactly the scheme's runtime layout.
        check_declared_result(
            self.format_pipeline, self.loaded_specs, self.runtime_specs, scheme, dims, f"{fmt.where} load"
        )
        self.plan = scheme.plan()
        self.loaded = False

    def _env(self, role: str):
        return self.scheme.env(self.dims, role)

    def final_layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Declared shapes after every post-load step, backend steps included (no data touched)."""
        state = {n: (s.shape, s.dtype) for n, s in self.loaded_specs.items()}
        return (self.format_pipeline + self.backend.post_load).declare(state, self._env)

    def load(self, tensors: Mapping[str, torch.Tensor], source: str = "weights") -> MoELayer:
        """Accept expert-stacked tensors in the format's layout, check them all, run post-load."""
        problems = conformance_problems(self.loaded_specs, tensors, source)
        if problems:
            raise LayoutError(
                f"{len(problems)} problem(s) with {source} for {self.format.where}: " + "; ".join(problems)
            )
        state = {n: (s.shape, s.dtype) for n, s in self.loaded_specs.items()}
        result = (self.format_pipeline + self.backend.post_load).run(tensors, state, self._env)
        for name, t in result.items():
            self.register_buffer(name, t, persistent=False)
        self._runtime_names = tuple(result)
        self.loaded = True
        return self

    def runtime_tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self._runtime_names}

    @torch.no_grad()
    def forward(
        self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        if not self.loaded:
            raise LayoutError("MoELayer.forward before load(): no weights")
        route = self.backend.route or route_tokens
        combine = self.backend.combine or combine_tokens
        offset = self.expert_offset
        if self._local_of is not None:
            topk_ids, offset = local_ids(self._local_of, topk_ids), 0
        x, counts, ctx = route(hidden_states, topk_ids, offset, self.dims.E)
        return combine(self.expert_rows(x, counts), topk_weights, ctx, hidden_states)

    @torch.no_grad()
    def expert_rows(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The compute plan on dispatched rows x (grouped by local expert, `counts` int64 [E]):
        one unweighted output row per input row."""
        if not self.loaded:
            raise LayoutError("MoELayer.expert_rows before load(): no weights")
        env: dict[str, object] = {**self.runtime_tensors(), "x": x, "counts": counts}
        for step in self.plan:
            result = self.backend.op(step.op)(
                **{a: None if n is None else env[n] for a, n in step.args.items()}
            )
            result = result if isinstance(result, tuple) else (result,)
            env.update(zip(step.out, result))
        return env["out"]


def local_id_table(experts: Sequence[int]) -> torch.Tensor:
    """int64 table: global expert id -> its index in `experts`, -1 for experts held elsewhere."""
    table = torch.full((max(experts, default=-1) + 1,), -1, dtype=torch.int64)
    table[torch.tensor(experts, dtype=torch.int64)] = torch.arange(len(experts), dtype=torch.int64)
    return table


def local_ids(table: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """topk_ids mapped through `local_id_table` (ids outside the table become -1: dropped)."""
    ids = topk_ids.long()
    inside = (ids >= 0) & (ids < table.numel())
    return torch.where(inside, table[ids.clamp(0, max(table.numel() - 1, 0))], -1)


def route_tokens(hidden_states: torch.Tensor, topk_ids: torch.Tensor, expert_offset: int, E: int):
    """Dispatch: rows of x sorted by local expert (stable), per-expert counts int64 [E], and a context
    for `combine_tokens`. Slots routed to experts outside [expert_offset, expert_offset+E) are dropped
    (expert-parallel ranks sum their outputs)."""
    k = topk_ids.shape[1]
    order = slot_order(topk_ids, expert_offset, E)
    counts = torch.bincount(topk_ids.reshape(-1).long()[order] - expert_offset, minlength=E).to(torch.int64)
    return hidden_states[order // k], counts, order


def slot_order(topk_ids: torch.Tensor, expert_offset: int, E: int) -> torch.Tensor:
    """Flat slot indices (token * k + j) routed to experts [expert_offset, expert_offset+E), sorted
    by expert (stable): the order rows are computed and combined in."""
    local = topk_ids.reshape(-1).long() - expert_offset
    slots = torch.nonzero((local >= 0) & (local < E)).squeeze(1)
    return slots[torch.argsort(local[slots], stable=True)]


def combine_tokens(
    out: torch.Tensor, topk_weights: torch.Tensor, order: torch.Tensor, hidden_states: torch.Tensor
) -> torch.Tensor:
    """Combine: weight each expert row by its routing weight and sum per token in fp32."""
    T, H = hidden_states.shape
    k = topk_weights.shape[1]
    y = out.float() * topk_weights.reshape(-1)[order].float().unsqueeze(1)
    res = torch.zeros(T, H, dtype=torch.float32, device=hidden_states.device)
    res.index_add_(0, order // k, y)
    return res.to(hidden_states.dtype)
