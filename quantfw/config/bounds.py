"""Every numeric bound of a config, in one place.

A typo (`tokens=10000000`, `num_experts=0`, `tp_rank=4` with `tp_size=4`) must be one line before
anything is allocated, not a kernel OOM kill or a traceback deep in a command. `check_values`
bounds each value on its own (run on every composed config); `check_memory` estimates what the
commands that build tensors from the config (demo, bench, eval) would allocate and refuses above
MEMORY_LIMIT. The numbers are documented in docs/security.md.
"""

from __future__ import annotations

from omegaconf import DictConfig

from quantfw.errors import ConfigError

MEMORY_LIMIT = 8 * 2**30  # bytes a command may allocate from config values alone
MAX_DIM = 1 << 17  # hidden / intermediate size (DeepSeek-V3: 7168 / 2048)
MAX_EXPERTS = 1 << 14
MAX_LAYERS = 1 << 12
MAX_TOKENS = 1 << 24
MAX_SEQ_LEN = 1 << 17

# (key, lowest, highest); None: no upper bound beyond the type's.
RANGES = (
    ("model.hidden_size", 1, MAX_DIM),
    ("model.moe_intermediate_size", 1, MAX_DIM),
    ("model.num_experts", 1, MAX_EXPERTS),
    ("model.top_k", 1, MAX_EXPERTS),
    ("model.num_layers", 1, MAX_LAYERS),
    ("model.first_moe_layer", 0, MAX_LAYERS - 1),
    ("model.num_shared_experts", 0, MAX_EXPERTS),
    ("model.n_group", 1, MAX_EXPERTS),
    ("model.topk_group", 1, MAX_EXPERTS),
    ("ep_size", 1, MAX_EXPERTS),
    ("tp_size", 1, MAX_DIM),
    ("ep_rank", 0, None),
    ("tp_rank", 0, None),
    ("tokens", 1, MAX_TOKENS),
    ("eval.ppl_tokens", 1, MAX_TOKENS),
    ("eval.seq_len", 1, MAX_SEQ_LEN),
    ("calibration.tokens", 1, MAX_TOKENS),
    ("calibration.seq_len", 1, MAX_SEQ_LEN),
    ("calibration.batch_size", 1, 1 << 12),
    ("calibration.max_rows", 1, MAX_TOKENS),
    ("calibration.guard_tokens", 0, MAX_TOKENS),
    ("calibration.min_tokens", 0, MAX_TOKENS),
    ("bench.repeats", 1, 1 << 12),
    ("bench.copy_mb", 1, MEMORY_LIMIT >> 21),  # source and copy both fit in the limit
    ("bench.threads", 0, 1 << 12),
    ("bench.group_size", 1, MAX_DIM),
    ("bench.reference.hidden_size", 1, MAX_DIM),
    ("bench.reference.moe_intermediate_size", 1, MAX_DIM),
    ("bench.reference.num_experts", 1, MAX_EXPERTS),
    ("bench.reference.top_k", 1, MAX_EXPERTS),
)

# (key, key it may not exceed, key it must stay below)
RELATIONS = (
    ("model.top_k", "model.num_experts", None),
    ("model.topk_group", "model.n_group", None),
    ("model.first_moe_layer", None, "model.num_layers"),
    ("ep_size", "model.num_experts", None),
    ("ep_rank", None, "ep_size"),
    ("tp_rank", None, "tp_size"),
    ("bench.reference.top_k", "bench.reference.num_experts", None),
)


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            return None
    return node


def _range(lo: int, hi: int | None) -> str:
    return f"[{lo}, {hi}]" if hi is not None else f">= {lo}"


def check_values(cfg: DictConfig) -> None:
    for key, lo, hi in RANGES:
        v = _get(cfg, key)
        if v is None or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if v < lo or (hi is not None and v > hi):
            raise ConfigError(f"{key}={v} is out of range {_range(lo, hi)}")
    for key, at_most, below in RELATIONS:
        v = _get(cfg, key)
        if v is None:
            continue
        if at_most and (m := _get(cfg, at_most)) is not None and v > m:
            raise ConfigError(f"{key}={v} exceeds {at_most}={m}")
        if below and (m := _get(cfg, below)) is not None and v >= m:
            raise ConfigError(f"{key}={v} must be below {below}={m}")
    bench_tokens = _get(cfg, "bench.tokens") or []
    bad = [t for t in bench_tokens if not 1 <= t <= MAX_TOKENS]
    if bad:
        raise ConfigError(f"bench.tokens: {list(bad)} out of range {_range(1, MAX_TOKENS)}")
    if (s := _get(cfg, "bench.max_seconds")) is not None and not 0 < s <= 3600:
        raise ConfigError(f"bench.max_seconds={s} is out of range (0, 3600]")


def _layer_bytes(E: int, H: int, I: int, k: int, tokens: int, weight_copies: int) -> int:
    """fp32 bytes of float experts (w13 [E, 2I, H] + w2 [E, H, I]) times the copies a command
    keeps, plus per-token activations (input, routing, SwiGLU input of each routed expert)."""
    weights = 3 * E * H * I * weight_copies
    activations = 4 * tokens * (H + E + 3 * k * I)
    return 4 * (weights + activations)


def estimate_bytes(cfg: DictConfig, command: str) -> int:
    """What `command` would allocate from the config's dims and token counts (0: not from config)."""
    m = cfg.model
    E, H, I, k = m.num_experts // cfg.ep_size, m.hidden_size, m.moe_intermediate_size, m.top_k
    if command == "demo":
        # Student-t draw (a 5x temporary) and each scheme's quantized copy; 2048 calibration tokens
        return _layer_bytes(E, H, I, k, cfg.tokens + 2048, weight_copies=8)
    if command == "eval":
        # the recipe's dims stand in for the checkpoint's (eval checks they agree)
        tokens = cfg.tokens + (cfg.eval.ppl_tokens if cfg.eval.perplexity else 0)
        return _layer_bytes(E, H, I, k, tokens, weight_copies=2)
    if command == "bench":
        b = cfg.bench
        layers = []
        for name in b.layers:
            r = b.reference if name == "reference" else None
            dims = (r.num_experts, r.hidden_size, r.moe_intermediate_size, r.top_k) if r else (E, H, I, k)
            layers.append(_layer_bytes(*dims, sum(b.tokens), weight_copies=2))
        return max(layers, default=0) + 2 * b.copy_mb * 2**20
    return 0


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_memory(cfg: DictConfig, command: str) -> None:
    need = estimate_bytes(cfg, command)
    if need > MEMORY_LIMIT:
        raise ConfigError(
            f"{command} with model={cfg.model.name} tokens={cfg.tokens} would allocate about {_gib(need)} "
            f"(limit {_gib(MEMORY_LIMIT)}); lower tokens or pick a smaller model"
        )
