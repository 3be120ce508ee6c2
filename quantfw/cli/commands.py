"""The command table of `quantfw` and each command's help page (`quantfw <command> --help`), as data.

Modules are imported only when their command runs, so optional extras stay optional. A page's
option defaults are read from the composed recipe when the page is printed, so they cannot drift
from the schema; its examples are run by tests/test_help_pages.py (relative `qfw/` scratch paths).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    summary: str  # the line of `quantfw --help`
    module: str  # has run(cfg)
    what: str  # what it does, a few lines
    required: tuple[str, ...] = ()  # "key=VALUE: meaning"
    options: tuple[tuple[str, str], ...] = ()  # (config key, meaning); the default is looked up
    examples: tuple[str, ...] = ()  # command lines, without the leading `quantfw`
    docs: str = "README.md"


COMMANDS: dict[str, Command] = {
    "tour": Command(
        "the journey in one go: example -> quantize with each scheme -> check -> eval, one table vs float",
        "quantfw.cli.tour",
        "Writes the recipe model's float checkpoint (example), quantizes it with every declared scheme the\n"
        "recipe's format holds, checks each and evaluates each against float (eval, with perplexity), one line\n"
        "per step, then one table: bytes on disk, rel-L2 / cosine, perplexity delta, check result. Files go to\n"
        "a temporary folder removed at the end unless out=DIR keeps them (with tour.log, each step's output).",
        (),
        (
            ("out", "keep the checkpoints, eval.json and tour.log here (a new or empty folder)"),
            ("model", "model dims and type (tiny, tiny_deepseek_v3, tiny_qwen3_moe, tiny_mixtral)"),
            ("format", "on-disk format every scheme is written in"),
            ("tokens", "synthetic tokens per layer for eval"),
            ("eval.ppl_tokens", "perplexity tokens (eval.perplexity=false skips perplexity)"),
        ),
        (
            "tour",
            "tour out=qfw/tour model=tiny_deepseek_v3 eval.perplexity=false",
        ),
        "docs/getting-started.md",
    ),
    "example": Command(
        "out=DIR [model=tiny_deepseek_v3|tiny_qwen3_moe|tiny_mixtral] [dtype=bf16|fp8]: a small float checkpoint to try",
        "quantfw.cli.example",
        "Writes a small random float checkpoint in the real release layout (transformers' save_pretrained,\n"
        "real model_type) to try quantize, check and eval on; dtype=fp8 writes the DeepSeek FP8 release\n"
        "layout (float8_e4m3fn weights with block scales). Needs the `hf` extra.",
        ("out=DIR: a new or empty folder",),
        (
            ("model", "model dims and type (tiny, tiny_deepseek_v3, tiny_qwen3_moe, tiny_mixtral)"),
            ("dtype", "bf16 or fp8"),
        ),
        ("example out=qfw/float", "example out=qfw/ds-fp8 model=tiny_deepseek_v3 dtype=fp8"),
        "docs/checkpoints.md",
    ),
    "demo": Command(
        "the main job: quantize the recipe's layer with every scheme, compare with float",
        "quantfw.cli.demo",
        "Builds the recipe's MoE layer from random float weights, quantizes it with the recipe's scheme and\n"
        "the comparison rows (conf/compare/rows.yaml), and prints each one's error against float\n"
        "(rel-L2, cosine, max abs) on synthetic tokens with outlier channels. Nothing is written unless out= is set.",
        (),
        (
            ("scheme", "the recipe's scheme (w8a8, w4a8, w4a8_clip)"),
            ("model", "model dims"),
            ("tokens", "tokens fed to the layer"),
            ("seed", "random seed"),
            ("out", "write the rows as JSON"),
        ),
        (
            "demo tokens=64",
            "demo scheme=w4a8 scheme.group_size=128 tokens=64",
        ),
        "docs/schemes.md",
    ),
    "plan": Command(
        "dry run on the meta device: parameters before/after post-load, model memory",
        "quantfw.cli.plan",
        "Allocates the recipe's layer on the meta device and runs its post-load pipeline: every tensor on\n"
        "disk and after post-load, the compute plan, and the routed-expert memory of the whole model on disk\n"
        "(format named) and in kernel memory, per scheme and per per-layer choice (`layers`). Nothing is computed.",
        (),
        (
            ("scheme", "the recipe's scheme"),
            ("format", "on-disk format (msmodelslim, compressed_tensors)"),
            ("model", "model dims"),
            ("layers", "per-layer scheme choices, e.g. {0-2:w8a8,61:w8a8}"),
            ("tp_size", "MoE tensor parallel size"),
            ("ep_size", "expert parallel size"),
            ("out", "write the plan as JSON (*.json)"),
        ),
        (
            "plan recipe=deepseek_v3_w4a8_clip",
            "plan recipe=deepseek_v3_w4a8_clip 'layers={0-2:w8a8,61:w8a8}' out=qfw/plan.json",
            "plan --multirun scheme=w8a8,w4a8,w4a8_clip",
        ),
        "docs/recipes.md",
    ),
    "quantize": Command(
        "float HF checkpoint (input=DIR) -> quantized checkpoint (output=DIR) in the recipe's scheme/format",
        "quantfw.cli.quantize",
        "Converts every routed expert of a float (bf16/fp16/fp32) or FP8 checkpoint into the recipe's scheme\n"
        "and format, shard by shard, and the non-expert linears quantize.targets names into W8A8. `layers`\n"
        "gives chosen decoder layers their own scheme. With engine=NAME the output is what that engine loads,\n"
        "checked after writing. A killed run resumes.",
        (
            "input=DIR: float or FP8 Hugging Face checkpoint",
            "output=DIR: new folder (overwrite=true replaces a quantfw output)",
        ),
        (
            ("scheme", "routed-expert scheme"),
            ("format", "on-disk format"),
            ("layers", "per-layer scheme choices, e.g. {0-2:w8a8,61:w8a8}"),
            ("engine", "serving-engine profile whose defaults apply (cann_recipes, sglang_npu, vllm_ascend)"),
            ("quantize.targets", "regexes of non-expert linears written W8A8"),
            ("quantize.mtp", "MTP layers: quantize or drop"),
            ("calibration.source", "none (alpha = 1) or model (learn W4A8-clip alphas from the float model)"),
            ("overwrite", "replace an existing quantfw output"),
        ),
        (
            "quantize input=qfw/float output=qfw/w4a8 scheme=w4a8",
            "quantize input=qfw/float output=qfw/w4a8_clip scheme=w4a8_clip format=compressed_tensors",
            "quantize recipe=deepseek_v3_w4a8_clip input=qfw/ds-fp8 output=qfw/ds-cann 'layers={0:w8a8,2:w8a8}'",
        ),
        "docs/checkpoints.md",
    ),
    "sensitivity": Command(
        "input=DIR [sensitivity.budget=0.1]: which MoE layers get sensitivity.wide (w8a8) within a byte budget",
        "quantfw.cli.sensitivity",
        "Runs the float model on the recipe's calibration tokens layer by layer, measures each MoE layer's\n"
        "expert output error in the recipe's scheme and in sensitivity.wide, and widens the layers with the\n"
        "largest error reduction per extra byte while the extra routed-expert bytes fit sensitivity.budget\n"
        "(fraction of the all-recipe-scheme bytes). Prints the plan and the `layers=` override for quantize.",
        ("input=DIR: float Hugging Face checkpoint",),
        (
            ("scheme", "the base scheme of every layer"),
            ("sensitivity.budget", "extra routed-expert bytes allowed (fraction)"),
            ("sensitivity.wide", "the scheme sensitive layers get"),
            ("calibration.tokens", "calibration tokens fed to the float model"),
            ("out", "write the `layers:` fragment (*.yaml) or the whole plan (*.json)"),
        ),
        (
            "sensitivity input=qfw/float scheme=w4a8 scheme.group_size=0 calibration.tokens=256 calibration.seq_len=128",
            "sensitivity input=qfw/float scheme=w4a8 sensitivity.budget=0.5 calibration.tokens=256 out=qfw/layers.yaml",
        ),
        "docs/accuracy.md",
    ),
    "check": Command(
        "checkpoint=DIR: every missing/unexpected/wrong-shape/wrong-dtype expert tensor vs the declared layout",
        "quantfw.cli.check",
        "One conformance report of a quantized checkpoint: index and shard problems, missing MoE layers,\n"
        "every routed-expert tensor against the layout its detected scheme and format declare (each layer's\n"
        "own scheme), out-of-range alphas; with engine=NAME also what that engine would refuse or compute\n"
        "differently. Exit 2 if anything is refused.",
        ("checkpoint=DIR: quantized checkpoint",),
        (
            ("engine", "also run this engine profile's rules"),
            ("tp_size", "MoE tensor parallel size the engine runs"),
            ("ep_size", "expert parallel size the engine runs"),
        ),
        ("check checkpoint=qfw/w4a8", "check checkpoint=qfw/ds-cann engine=cann_recipes ep_size=4"),
        "docs/engines.md",
    ),
    "eval": Command(
        "checkpoint=DIR reference=DIR: per-layer error of the quantized MoE layers vs the float ones",
        "quantfw.cli.evaluate",
        "Loads each quantized MoE layer (with its own scheme) and its float original and prints rel-L2,\n"
        "cosine, max abs and the worst experts per layer on synthetic tokens; eval.perplexity=true adds the\n"
        "causal-LM perplexity delta with its 95% interval. engine=NAME computes what that engine computes.",
        ("checkpoint=DIR: quantized checkpoint", "reference=DIR: the float checkpoint it came from"),
        (
            ("tokens", "synthetic tokens per layer"),
            ("engine", "compute as this engine does"),
            ("eval.per_expert", "per-expert errors"),
            ("eval.perplexity", "perplexity of the float vs quantized model"),
            ("out", "write the documented JSON"),
        ),
        (
            "eval checkpoint=qfw/w4a8 reference=qfw/float",
            "eval checkpoint=qfw/w4a8 reference=qfw/float tokens=64 out=qfw/eval.json",
        ),
        "docs/evaluation.md",
    ),
    "bench": Command(
        "forward latency per scheme and backend mode vs float baselines and the memory roofline; load time",
        "quantfw.cli.bench",
        "Times the reference MoE layer and the recipe's layer per scheme, token count and backend mode\n"
        "against float baselines and the memory-bandwidth roofline, and the load + post-load time. Numbers\n"
        "depend on the machine's load.",
        (),
        (
            ("bench.tokens", "token counts timed"),
            ("bench.modes", "torch backend modes"),
            ("bench.schemes", "schemes timed"),
            ("bench.layers", "reference and/or model"),
            ("bench.load", "also time load + post-load"),
            ("out", "JSON file the records are appended to"),
        ),
        (
            "bench bench.tokens=[1] bench.modes=[exact] bench.layers=[model] bench.load=false bench.schemes=[w8a8] bench.repeats=1",
            "bench 'bench.tokens=[1,16]' bench.layers=[model] bench.load=false bench.repeats=1 out=qfw/bench.json",
        ),
        "docs/performance.md",
    ),
}
