"""Typed schemas of every config group, registered with Hydra's ConfigStore.

Hydra checks overrides against these (wrong types, unknown keys); `validate()` repeats the check
after composition because `+key=` can still add keys to a schema node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from quantfw.quantize.observers import default_sections


@dataclass
class ModelConfig:
    name: str = MISSING
    hidden_size: int = MISSING
    moe_intermediate_size: int = MISSING
    num_experts: int = MISSING
    top_k: int = MISSING
    num_layers: int = MISSING
    first_moe_layer: int = 0  # DeepSeek-V3: the first 3 layers are dense
    num_shared_experts: int = 0
    routing: str = "softmax_topk"  # softmax_topk | grouped_sigmoid
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # On-disk key of one expert projection; {layer}, {expert} and {proj} are filled in.
    expert_key: str = "model.layers.{layer}.mlp.experts.{expert}.{proj}"
    proj_names: dict[str, str] = field(
        default_factory=lambda: {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    )
    hf_model_type: str = ""
    doc: str = ""


@dataclass
class SchemeConfig:
    name: str = MISSING
    weight_bits: int = 8
    weight_bits_range: list[int] = field(default_factory=lambda: [2, 8])  # what its runtime layout holds
    group_size: int = 0  # 0 = per-channel
    activation_use_clip: bool = False
    fused_swiglu_quant: bool = True  # W8A8: npu_dequant_swiglu_quant (True) or the unfused plan
    weight_observer: str = "minmax"  # minmax | mse | ssz | learned_clip | gptq (quantize/observers.py)
    # Each observer's typed config, observers.NAME.FIELD (e.g. observers.gptq.damp): the defaults
    # of the registered observers; quantfw.quantize.observers checks names, keys and values.
    observers: dict[str, Any] = field(default_factory=default_sections)
    # Deprecated flat keys (null = not given): each sets every observer having that parameter.
    observer_grid: int | None = None
    observer_min_ratio: float | None = None
    ssz_iters: int | None = None
    observer_min_tokens: int | None = None
    fallback_observer: str | None = None
    gptq_damp: float | None = None
    gptq_block: int | None = None
    gptq_act_order: bool | None = None
    gptq_scale_observer: str | None = None
    missing_alpha: str = "error"  # error | ones: what loading does when a clip checkpoint has no alpha
    runtime: dict[str, Any] = field(default_factory=dict)
    compute: list[Any] = field(default_factory=list)
    doc: str = ""


@dataclass
class FormatConfig:
    name: str = MISSING
    metadata: Any = MISSING  # {style: NAME, ...}: how its metadata is written and detected (io/metadata.py)
    tensors: dict[str, Any] = field(default_factory=dict)
    load: list[Any] = field(default_factory=list)
    requires: list[Any] = field(default_factory=list)
    doc: str = ""


@dataclass
class BackendConfig:
    name: str = MISSING  # torch | npu | npu_sim
    mode: str = "exact"  # one of `modes` (torch: exact | fast)
    modes: dict[str, Any] = field(default_factory=dict)  # mode -> its post-load steps (empty: `mode` only)
    post_load: list[Any] = field(default_factory=list)
    allow_unclipped_fallback: bool = False
    # npu / npu_sim: clip op path auto|native|composed; whether the simulated torch_npu has the
    # cann-recipes npu_swiglu_clip_quant custom op (torch_npu 2.13.0 does not).
    swiglu_clip: str = "auto"
    sim_has_swiglu_clip_quant: bool = False
    doc: str = ""


@dataclass
class CalibrationConfig:
    """How `quantize` obtains W4A8-clip alphas (used only when the scheme clips)."""

    source: str = "none"  # none (alpha = 1, recorded) | model (run the float input model)
    tokens: int = 2048  # calibration tokens fed to the float model
    seq_len: int = 256  # tokens per forward window
    batch_size: int = 4  # windows per forward
    min_tokens: int = 16  # experts with fewer routed calibration tokens follow `policy`
    policy: str = "ones"  # ones (alpha = 1, reported) | fail (error naming layer/expert)
    max_rows: int | None = 1024  # pre-SwiGLU rows kept per expert for the alpha search
    guard_tokens: int = 1024  # extra tokens for the model-level guard on learned alphas (0: off)
    # One decoder layer in memory at a time (false: the whole float model, which the guard needs).
    layerwise: bool = True
    all_experts: bool = False  # every expert sees every token for its statistics (outputs: routed only)
    # Expert equalizers run on each layer's captured rows before the alpha search and the
    # observers (quantfw.calibrate.equalize registry, e.g. [updown]); grid = points of its search.
    equalize: list[str] = field(default_factory=list)
    equalize_grid: int = 21
    # Input smoothing folded into the post-attention norm (quantfw.calibrate.smooth): measured by
    # benchmarks/smollm2_accuracy.py; quantize refuses true until it writes the folded tensors.
    smooth: bool = False
    propagate: str = "float"  # what the next layer sees: float outputs, or quantized (sequential)
    memory_budget_mb: int = 2048  # hidden states above this stay on disk (read a batch at a time)
    # A layer's alpha-search rows and packed down-projections beyond this wait in the work dir.
    search_memory_mb: int = 512
    expert_block: int = 4  # routed experts per weight read (two blocks are in memory at once)
    progress: bool = True  # one line per layer on stderr


@dataclass
class EvalConfig:
    """Extra outputs of `quantfw eval` (the per-layer table is always printed)."""

    per_expert: bool = True  # rel_l2 / cosine / max_abs per expert on the tokens routed to it
    plot: str | None = None  # PNG path: error by layer/expert, alpha histogram (needs matplotlib)
    perplexity: bool = False  # float vs quantized causal-LM perplexity (reference = float model)
    ppl_tokens: int = 2048  # held-out tokens for perplexity
    seq_len: int = 256  # perplexity window
    table: str | None = None  # markdown table rebuilt from every row of `out` (multirun comparison)


@dataclass
class BenchLayerConfig:
    """The benchmark's reference layer (issue 6): E=64, H=2048, I=1408, top-6, uniform routing."""

    num_experts: int = 64
    hidden_size: int = 2048
    moe_intermediate_size: int = 1408
    top_k: int = 6


@dataclass
class BenchConfig:
    """`quantfw bench`: what to time (see docs/performance.md)."""

    tokens: list[int] = field(default_factory=lambda: [1, 16, 128, 1024])
    modes: list[str] = field(default_factory=list)  # backend modes; empty: all the backend declares
    # keys of conf/compare/rows.yaml `bench`, or `recipe`; empty: every declared variant
    schemes: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=lambda: ["reference", "model"])  # model = the recipe's
    group_size: int = 256  # w4a8_group: the largest of this, 128, 64 dividing both K
    repeats: int = 7  # timed runs per point (after one warm-up), fewer if max_seconds runs out
    max_seconds: float = 3.0  # time budget per point: exact mode at 1024 tokens is slow
    load: bool = True  # also time load + post-load vs a raw safetensors read
    copy_mb: int = 1024  # size of the copy that measures memory bandwidth
    threads: int = 0  # torch intra-op threads (0: torch's default); 1 is steadier on a busy machine
    reference: BenchLayerConfig = field(default_factory=BenchLayerConfig)


@dataclass
class SensitivityConfig:
    """`quantfw sensitivity`: mixed precision by measurement (quantfw/cli/sensitivity.py)."""

    budget: float = 0.1  # extra routed-expert bytes allowed, as a fraction of the all-recipe-scheme bytes
    wide: str = "w8a8"  # the scheme the most sensitive layers get (a conf/scheme name)


@dataclass
class QuantizeConfig:
    """Non-expert linears for `quantfw quantize`: 2D `<module>.weight` tensors whose module name
    matches a `targets` regex (re.search) and no `ignore` regex are written W8A8 (per-channel
    int8); everything else passes through. Routed experts always follow the scheme.
    `mtp`: the MTP layers of a DeepSeek release (`num_nextn_predict_layers`): `quantize` them as
    any other layer (routed experts per the scheme; the reference converter does too) or `drop`
    them (config num_nextn_predict_layers becomes 0)."""

    targets: list[str] = field(default_factory=list)
    ignore: list[str] = field(
        default_factory=lambda: [r"(^|\.)mlp\.gate$", r"(^|\.)lm_head$", r"embed", r"norm", r"(^|\.)gate$"]
    )
    mtp: str = "quantize"  # quantize | drop
    # The scheme (conf/scheme name) the non-expert linears are written in: its layout flags apply,
    # with the routed experts' observer.
    linear_scheme: str = "w8a8"
    # float32 | bfloat16: bfloat16 reproduces the cann-recipes reference converter's rounding chain
    # (minmax per-channel: routed experts and W8A8 linears; docs/engines.md)
    compute_dtype: str = "float32"


@dataclass
class QuantfwConfig:
    model: ModelConfig = MISSING
    scheme: SchemeConfig = MISSING
    format: FormatConfig = MISSING
    backend: BackendConfig = MISSING
    seed: int = 0
    tokens: int = 256  # tokens fed to the layer by demo / eval
    layer: int = -1  # which MoE layer a command works on (-1: the first MoE layer)
    ep_size: int = 1
    ep_rank: int = 0
    tp_size: int = 1
    tp_rank: int = 0
    # Routed experts per process (quantfw/parallel/placement.py): null = contiguous blocks, or one
    # list of expert ids per rank (an expert listed on several ranks is a redundant copy).
    placement: Any = None
    # Seconds any torch.distributed collective may wait (quantfw/parallel/dist.py): more than the
    # longest step one rank does alone (a layer's alpha search on rank 0 at real dims: minutes).
    dist_timeout_s: float = 1800.0
    input: str | None = None
    output: str | None = None
    checkpoint: str | None = None
    reference: str | None = None
    out: str | None = None
    overwrite: bool = False
    progress: bool = True
    dtype: str = "bf16"  # quantfw example: bf16 | fp8
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    engine: Any = None  # serving-engine profile: config group conf/engine (docs/engines.md)
    # Per-layer scheme choices: {"0-2": w8a8, "61": w8a8} (quantfw/config/layer_choice.py)
    layers: Any = None


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="quantfw_schema", node=QuantfwConfig)
