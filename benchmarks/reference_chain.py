"""fp32 vs bf16 (`quantize.compute_dtype`) quantization on a tiny FP8 DeepSeek-V3: weight error of
routed experts (W4 per channel) and W8A8 linears, and the MoE layer's output error, each against
the float weights (docs/engines.md). Usage: python benchmarks/reference_chain.py [WORKDIR]."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from engine_helpers import deepseek_fp8  # noqa: E402

from quantfw.api import components  # noqa: E402
from quantfw.config.compose import compose  # noqa: E402
from quantfw.engines import load_profile  # noqa: E402
from quantfw.eval.checkpoint import evaluate_checkpoint  # noqa: E402
from quantfw.io import fp8  # noqa: E402
from quantfw.io.reader import CheckpointReader  # noqa: E402
from quantfw.quantize import primitives as P  # noqa: E402
from quantfw.quantize.checkpoint import quantize_checkpoint  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def weight_errors(release: Path) -> dict[str, dict[str, float]]:
    r = CheckpointReader(release)
    out: dict[str, dict[str, list[float]]] = {}
    for key in r.keys():
        if not key.endswith(".weight") or r.info(key).dtype != torch.float8_e4m3fn:
            continue
        w = fp8.read_float(r, key)
        kind, bits = ("expert W4", 4) if ".experts." in key else ("linear W8", 8)
        for mode, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            q, s = P.quantize_per_channel(w.to(dtype).float() if dtype != torch.float32 else w, bits, compute_dtype=dtype)
            out.setdefault(kind, {}).setdefault(mode, []).append(rel(P.dequantize(q, s), w))
    return {k: {m: sum(v) / len(v) for m, v in d.items()} for k, d in out.items()}


def main(work: Path) -> None:
    release, flt = deepseek_fp8(work)
    scheme, fmt, _ = components(compose("default", ["scheme=w4a8_clip", "format=compressed_tensors"]))
    q = load_profile("cann_recipes").quantize
    outs = {}
    for mode in ("float32", "bfloat16"):
        ckpt = quantize_checkpoint(
            release, work / mode, scheme, fmt, progress=False, targets=list(q.targets), ignore=list(q.ignore), compute_dtype=mode
        )
        outs[mode] = evaluate_checkpoint(ckpt, flt, tokens=512, seed=0)
    print("| | fp32 mode | bf16 mode |\n|---|---|---|")
    for kind, d in weight_errors(release).items():
        print(f"| {kind} weight rel-L2 (mean over tensors) | {d['fp32']:.5f} | {d['bf16']:.5f} |")
    for i, row in enumerate(outs["float32"]):
        b = outs["bfloat16"][i]
        print(f"| MoE layer {row['layer']} output rel-L2 vs float | {row['rel_l2']:.5f} | {b['rel_l2']:.5f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
