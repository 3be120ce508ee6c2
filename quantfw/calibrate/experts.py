"""Per-expert calibration of the W4A8-clip alpha from a float model's own activations.

`ExpertCapture` hooks float experts modules (the `forward(hidden [T,H], topk_weights, topk_ids)`
contract of quantfw.moe) and keeps, per layer and expert, the pre-SwiGLU rows h = x @ w13[e].T in
fp32 plus how many tokens the router sent there. `learn_expert_alphas` turns one layer's capture
into alpha [E] with `search_alpha` (spec 1.4: the clip acts on the w2 input only) and applies the
recipe's coverage policy to experts that saw too few tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from quantfw import ops
from quantfw.calibrate.alpha import ExpertRows, search_layer_alphas
from quantfw.calibrate.row_store import CompactWeight, RowStore, SpilledRows
from quantfw.errors import CalibrationError, ConfigError
from quantfw.quantize.experts import fake_quant_weights
from quantfw.schemes.scheme import Scheme

__all__ = [
    "POLICIES",
    "ExpertCapture",
    "LayerCapture",
    "alpha_metadata",
    "expert_alpha_rows",
    "learn_expert_alphas",
    "search_expert_rows",
]

POLICIES = ("ones", "fail")
METHOD = "grid_search_output_mse"
# search_alpha's defaults, recorded so the metadata says exactly what ran.
GRID = {
    "lo": 0.05,
    "hi": 1.0,
    "steps": 20,
    "refine": 10,
    "holdout": 4,
    "min_z": 2.0,
    "sweeps": 2,
}


@dataclass
class LayerCapture:
    """One layer's calibration rows: rows[e] are h rows [M_e, 2I] and inputs[e] the matching routed
    hidden rows x [M_e, H] (at most max_rows kept: a uniform sample of every row the expert saw, not
    the first ones, since calibration text changes topic as it goes), counts[e] the number of tokens routed to e (all
    of them, including rows beyond the cap). tokens[e] / weights[e] say which layer token each kept
    row belongs to and its routing weight, so the alpha search can score the combined layer output
    (rows added without a token get one of their own). Calling it as `cap(role, e)` gives the weight
    observers' calibration inputs (quantfw.quantize.experts.CalibrationInputs): w13 -> x, w2 ->
    swiglu(h)."""

    layer: int
    num_experts: int
    max_rows: int | None = None
    rows: list[list[torch.Tensor]] = field(default_factory=list)
    counts: torch.Tensor | None = None
    inputs: list[list[torch.Tensor]] = field(default_factory=list)
    tokens: list[list[torch.Tensor]] = field(default_factory=list)
    weights: list[list[torch.Tensor]] = field(default_factory=list)
    routed: list[list[torch.Tensor]] = field(default_factory=list)  # bool per kept row
    seen: int = 0  # layer tokens numbered so far
    # Where the layer's alpha-search rows wait (held or spilled); None: held (the whole-model path).
    store: RowStore | None = None
    keys: list[list[torch.Tensor]] = field(default_factory=list)  # random sampling key of each kept row

    def __post_init__(self):
        # One key stream per expert: a row's key depends on its expert and arrival order only, so
        # experts can be captured in any interleaving (whole model, or a block at a time).
        self._gens: dict[int, torch.Generator] = {}
        self.keys = [[] for _ in range(self.num_experts)]
        self.rows = [[] for _ in range(self.num_experts)]
        self.inputs = [[] for _ in range(self.num_experts)]
        self.tokens = [[] for _ in range(self.num_experts)]
        self.weights = [[] for _ in range(self.num_experts)]
        self.routed = [[] for _ in range(self.num_experts)]
        self.counts = torch.zeros(self.num_experts, dtype=torch.int64)

    def _gen(self, e: int) -> torch.Generator:
        if e not in self._gens:
            self._gens[e] = torch.Generator().manual_seed(self.layer * 1_000_003 + e)
        return self._gens[e]

    def kept(self, e: int) -> int:
        return sum(t.shape[0] for t in self.tokens[e])

    def add(
        self,
        e: int,
        h: torch.Tensor,
        x: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        routed: torch.Tensor | None = None,
    ) -> None:
        """Rows of expert e; `routed` (bool [n], default all) marks the rows the router sent to e
        (calibration.all_experts adds the others too, for the observers' statistics only)."""
        n = h.shape[0]
        if tokens is None:
            tokens, self.seen = torch.arange(self.seen, self.seen + n), self.seen + n
        routed = torch.ones(n, dtype=torch.bool) if routed is None else routed.to(torch.bool)
        self.counts[e] += int(routed.sum())
        new = {
            "rows": h.detach().to(torch.float32),
            "tokens": tokens.to(torch.int64),
            "weights": (torch.ones(n) if weights is None else weights.detach()).to(torch.float32),
            "routed": routed,
            "keys": torch.rand(n, generator=self._gen(e)),
        }
        if x is not None:
            new["inputs"] = x.detach().to(torch.float32)
        full = self.max_rows is not None and self.kept(e) + n > self.max_rows
        for name, t in new.items():
            getattr(self, name)[e].append(t if full else t.clone())
        if full:  # bottom-k by key over all rows so far: a uniform sample, whatever the order
            keep = torch.cat(self.keys[e]).topk(self.max_rows, largest=False).indices.sort().values
            for name in new:
                parts = getattr(self, name)[e]
                if parts:
                    parts[:] = [torch.cat(parts)[keep]]

    def drop_rows(self, e: int) -> None:
        """Free expert e's rows and inputs (tokens, weights and counts stay: the kept sample)."""
        self.rows[e], self.inputs[e] = [], []

    def kept_tokens(self, e: int) -> torch.Tensor:
        return torch.cat(self.tokens[e]) if self.tokens[e] else torch.zeros(0, dtype=torch.int64)

    def h(self, e: int) -> torch.Tensor:
        return torch.cat(self.rows[e]) if self.rows[e] else torch.zeros(0, 0)

    def x(self, e: int) -> torch.Tensor:
        return torch.cat(self.inputs[e]) if self.inputs[e] else torch.zeros(0, 0)

    def __call__(self, role: str, e: int) -> torch.Tensor | None:
        """Calibration inputs of expert e's `role` projection; None when nothing was captured."""
        if not self.rows[e]:
            return None
        if role == "w13":
            return self.x(e) if self.inputs[e] else None
        return ops.swiglu(self.h(e))


class ExpertCapture:
    """Forward hooks on float experts modules that record each expert's pre-SwiGLU rows.

    experts: {layer_index: (module, w13 [E, 2I, H])}. The hook reads the module's inputs
    (hidden [T,H], topk_weights [T,k], topk_ids [T,k]) so routing is whatever the model did.
    """

    def __init__(
        self,
        experts: Mapping[int, tuple[nn.Module, torch.Tensor]],
        max_rows: int | None = None,
        all_experts: bool = False,
    ):
        self.experts = dict(experts)
        self.all_experts = all_experts  # every expert captures every token (routed ones flagged)
        self.layers = {
            layer: LayerCapture(layer, w13.shape[0], max_rows) for layer, (_, w13) in self.experts.items()
        }

    def _hook(self, layer: int, w13: torch.Tensor):
        cap = self.layers[layer]

        def hook(_module, args, _output):
            hidden, weights, ids = args[:3]
            x = hidden.to(torch.float32)
            number = torch.arange(cap.seen, cap.seen + x.shape[0])
            cap.seen += x.shape[0]
            for e in range(cap.num_experts):
                hit = ids == e
                tok = hit.any(dim=-1)
                w = (weights.to(torch.float32) * hit).sum(-1)
                if self.all_experts:
                    cap.add(e, x @ w13[e].to(torch.float32).T, x, tokens=number, weights=w, routed=tok)
                elif tok.any():
                    xe = x[tok]
                    cap.add(e, xe @ w13[e].to(torch.float32).T, xe, tokens=number[tok], weights=w[tok])

        return hook

    @contextmanager
    def attached(self):
        handles = [
            m.register_forward_hook(self._hook(layer, w13)) for layer, (m, w13) in self.experts.items()
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @property
    def tokens(self) -> int:
        """Routed token-slots seen over all layers and experts."""
        return int(sum(c.counts.sum() for c in self.layers.values()))


def _check_policy(min_tokens: int, policy: str) -> None:
    if policy not in POLICIES:
        raise ConfigError(f"calibration policy '{policy}' (allowed: {', '.join(POLICIES)})")
    if min_tokens < 1:
        raise ConfigError(f"calibration min_tokens={min_tokens} (must be >= 1)")


def expert_alpha_rows(
    scheme: Scheme,
    w13: torch.Tensor,
    w2: torch.Tensor,
    captured: LayerCapture,
    experts: range,
    min_tokens: int = 16,
    policy: str = "ones",
) -> tuple[list[ExpertRows | SpilledRows | None], list[dict]]:
    """The alpha search's rows and report rows of `experts`, whose float weights w13 [B, 2I, H] and
    w2 [B, H, I] are given in that order (a block of the layer, or all of it). Only rows the router
    sent to an expert enter the search (calibration.all_experts captures the others for the
    observers). Experts with fewer than `min_tokens` rows get None (policy "ones", reported as a
    fallback) or raise CalibrationError (policy "fail")."""
    _check_policy(min_tokens, policy)
    two_i = w13.shape[1]
    rows: list[ExpertRows | None] = []
    report: list[dict] = []
    for j, e in enumerate(experts):
        routed = torch.cat(captured.routed[e]) if captured.routed[e] else torch.zeros(0, dtype=torch.bool)
        pick = None if bool(routed.all()) else routed
        h = captured.h(e) if pick is None else captured.h(e)[pick]
        report.append(
            {"layer": captured.layer, "expert": e, "tokens": int(captured.counts[e]), "rows": h.shape[0]}
        )
        rows.append(None)
        if h.shape[0] < min_tokens:
            if policy == "fail":
                raise CalibrationError(
                    f"layer {captured.layer} expert {e}: {h.shape[0]} calibration tokens, "
                    f"expected >= min_tokens={min_tokens} (policy fail)"
                )
            report[j].update(alpha=1.0, status="fallback_too_few_tokens")
            continue
        if h.shape[1] != two_i:
            raise CalibrationError(
                f"layer {captured.layer} expert {e}: captured rows have width {h.shape[1]}, expected 2I={two_i}"
            )
        if not torch.isfinite(h).all():
            raise CalibrationError(f"layer {captured.layer} expert {e}: non-finite calibration activations")
        # The deployed clip sees h after int8 activations and the int4 first GEMM (bf16 output), not
        # the float h: search on those rows, measured against the float expert output.
        h_dep, x = h, captured.x(e)
        if x.numel():
            x = x if pick is None else x[pick]
            # Per expert, and only for experts that search: the quantizers act per expert, so
            # this equals quantizing the block, without a second block-sized copy.
            deq13 = _fake_quant(scheme, w13[j])
            xq, xs = ops.dynamic_quant(x)
            h_dep = ((xq.float() * xs.unsqueeze(-1)) @ deq13.T).to(torch.bfloat16).float()
            del deq13
        tokens, weight = torch.cat(captured.tokens[e]), torch.cat(captured.weights[e])
        found = ExpertRows(
            h=h_dep,
            ref=ops.swiglu(h) @ w2[j].float().T,
            w2_deq=CompactWeight.of(fake_quant_weights(scheme, w2[j].unsqueeze(0))),
            tokens=tokens if pick is None else tokens[pick],
            weight=weight if pick is None else weight[pick],
        )
        rows[j] = found if captured.store is None else captured.store.keep(e, found)
    return rows, report


def _fake_quant(scheme: Scheme, w: torch.Tensor) -> torch.Tensor:
    """One expert's weight [N, K] quantized as the scheme declares and dequantized, fp32."""
    return fake_quant_weights(scheme, w.unsqueeze(0)).dequantize()[0].float()


def search_expert_rows(rows: list[ExpertRows | None], report: list[dict]) -> tuple[torch.Tensor, list[dict]]:
    """alpha [E] from one layer's rows (`expert_alpha_rows` over every expert, in order); the
    report rows of learned experts get their errors."""
    found = search_layer_alphas(
        rows,
        lo=GRID["lo"],
        steps=GRID["steps"],
        refine=GRID["refine"],
        holdout=GRID["holdout"],
        min_z=GRID["min_z"],
        sweeps=GRID["sweeps"],
    )
    for e, r in enumerate(found.experts):
        if r is not None:
            report[e].update(
                alpha=r.alpha, error=r.error, error_at_one=r.error_at_one, heldout_z=r.z, status="learned"
            )
            report[e]["layer_error"], report[e]["layer_error_at_one"] = found.error, found.error_at_one
    return found.alphas, report


def learn_expert_alphas(
    scheme: Scheme,
    w13: torch.Tensor,
    w2: torch.Tensor,
    captured: LayerCapture,
    min_tokens: int = 16,
    policy: str = "ones",
) -> tuple[torch.Tensor, list[dict]]:
    """alpha [E] in (0, 1] for one layer, and one report row per expert.

    The int4 weights are quantized as the scheme declares, so the search sees the weight error the
    layer will run with; alphas minimise the layer output error (quantfw.calibrate.alpha). Experts
    with fewer than `min_tokens` captured rows follow `policy` (see `expert_alpha_rows`)."""
    _check_policy(min_tokens, policy)
    E = w13.shape[0]
    if captured.num_experts != E or tuple(w2.shape[:1]) != (E,):
        raise CalibrationError(
            f"layer {captured.layer}: capture has {captured.num_experts} experts, weights have {E}"
        )
    rows, report = expert_alpha_rows(scheme, w13, w2, captured, range(E), min_tokens, policy)
    return search_expert_rows(rows, report)


def alpha_metadata(report: list[dict], data: str, min_tokens: int, policy: str) -> dict:
    """How the alphas were obtained, for checkpoint metadata (JSON-serialisable)."""
    fallback = [(r["layer"], r["expert"]) for r in report if r["status"] != "learned"]
    return {
        "method": METHOD,
        "objective": (
            "relative L2 of the layer output (routing-weighted sum of the experts' clipped int8 w2 input "
            "x int4 w2) vs float, coordinate descent over experts; clip applied to the deployed rows "
            "(int8 activations x int4 w13, bf16) when expert inputs were captured; alpha < 1 kept only if, "
            "on every 4th token (held out of the search), its mean per-token gain over alpha = 1 is at "
            "least min_z standard errors above zero"
        ),
        "grid": dict(GRID),
        "tokens": int(sum(r["tokens"] for r in report)),
        "rows_used": int(sum(r["rows"] for r in report if r["status"] == "learned")),
        "data": data,
        "min_tokens": min_tokens,
        "policy": policy,
        "fallback_experts": [list(x) for x in fallback],
    }
