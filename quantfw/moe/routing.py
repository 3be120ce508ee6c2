"""Routing helpers: router logits -> (topk_weights fp32 [T, k], topk_ids int64 [T, k]).

Self-contained (torch only) so callers that only have router logits can feed any experts module
(`forward(hidden_states [T, H], topk_weights [T, k], topk_ids [T, k]) -> [T, H]`).

- `softmax_topk`: Mixtral (renormalize=True; softmax over the top-k logits equals softmax over all
  experts, top-k, renormalise) and Qwen3-MoE (renormalize = config.norm_topk_prob).
- `grouped_topk_sigmoid`: DeepSeek-V3 (sigmoid scores, biased selection by groups, unbiased
  weights, renormalise, times routed_scaling_factor).

Ids come out sorted by descending selection score; only the (id, weight) pairs matter to an
experts module, so the order within a token is not part of the contract.
"""

from __future__ import annotations

import torch

from quantfw.errors import ConfigError

__all__ = ["softmax_topk", "grouped_topk_sigmoid"]


def _check_logits(logits: torch.Tensor, k: int) -> None:
    if logits.dim() != 2:
        raise ConfigError(f"router logits must be [T, E], got shape {tuple(logits.shape)}")
    num_experts = logits.shape[-1]
    if not 1 <= k <= num_experts:
        raise ConfigError(f"top_k must be in [1, {num_experts}] (number of experts), got {k}")


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax routing: softmax over all experts in fp32, top-k, optionally renormalise to sum 1.

    Mixtral uses renormalize=True; Qwen3-MoE uses renormalize=norm_topk_prob.
    Returns (weights fp32 [T, k], ids int64 [T, k]).
    """
    _check_logits(logits, k)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int64)


def grouped_topk_sigmoid(
    logits: torch.Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    correction_bias: torch.Tensor | None = None,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing ("noaux_tc").

    scores = sigmoid(logits) in fp32; selection uses scores + correction_bias: each of the n_group
    groups is scored by the sum of its top-2 biased scores, the topk_group best groups are kept and
    the top-k experts are chosen among them. The weights are the UNbiased scores of the chosen
    experts, divided by their sum (+1e-20) when renormalize, then times routed_scaling_factor.
    Returns (weights fp32 [T, k], ids int64 [T, k]).
    """
    _check_logits(logits, k)
    num_tokens, num_experts = logits.shape
    if n_group < 1 or num_experts % n_group:
        raise ConfigError(f"n_group={n_group} must divide the number of experts {num_experts}")
    per_group = num_experts // n_group
    if per_group < 2:
        raise ConfigError(
            f"grouped routing needs >= 2 experts per group, got {per_group} (n_group={n_group})"
        )
    if not 1 <= topk_group <= n_group:
        raise ConfigError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    if k > topk_group * per_group:
        raise ConfigError(f"top_k={k} exceeds the {topk_group * per_group} experts in the kept groups")

    scores = torch.sigmoid(logits.float())
    choice = scores
    if correction_bias is not None:
        if correction_bias.shape != (num_experts,):
            raise ConfigError(
                f"correction_bias must have shape [{num_experts}], got {tuple(correction_bias.shape)}"
            )
        choice = scores + correction_bias.to(device=scores.device, dtype=torch.float32)
    group_scores = choice.view(num_tokens, n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, topk_group, dim=-1)[1]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    expert_mask = group_mask.unsqueeze(-1).expand(num_tokens, n_group, per_group).reshape(num_tokens, -1)
    choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = torch.topk(choice, k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int64)
