"""quantfw at DeepSeek-V3's true layer dims: a synthetic FP8 release in, NPU-ready checkpoints out.

Not a test. Writes a synthetic FP8 checkpoint in the DeepSeek-V3 release layout (H 7168, dense I
18432, moe I 2048, 256 routed + 1 shared expert, MLA attention: q_lora 1536, kv_lora 512, 128 heads
of 128 + 64 rope dims), with 1 dense layer and then 1 or 2 MoE layers (about 11 GB of FP8 per
MoE layer), weight_block_size 128 x 128, ~4 GB shards like the release. Then runs
`python -m quantfw quantize` on it in a child process per case and records wall time, input
G params/s and peak RSS (the child's VmHWM, via /usr/bin/time when present).

    python benchmarks/real_scale.py --data ../real_scale_data --moe-layers 1 2 --out results/real_scale.json
    python benchmarks/real_scale.py ... --cases minmax_w4a8_clip calib512_w4a8_clip --cold

Weights: a pool of random bf16-scale matrices (std 0.02, a few outlier rows) quantized to FP8
blocks once and reused across experts (content does not change the cost). The vocabulary is cut
to 32k (embedding and lm_head are copied, not quantized; their cost is not a layer cost).
Delete --data afterwards (tens of GB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
H, I_DENSE, I_MOE, E, Q_LORA, KV_LORA, HEADS, NOPE, ROPE, V = 7168, 18432, 2048, 256, 1536, 512, 128, 128, 64, 128
VOCAB, BLOCK, SHARD_BYTES, POOL = 32000, 128, 4 << 30, 8

CASES = {
    # name: (recipe, extra overrides)
    "minmax_w4a8_clip": ("deepseek_v3_w4a8_clip", []),
    "minmax_w8a8": ("deepseek_v3_w8a8", []),
    "calib512_w4a8_clip": ("deepseek_v3_w4a8_clip", ["calibration.source=model", "calibration.tokens=512"]),
    # With --experts 16: the 16 routed rows per expert a 256-expert layer gets from 512 tokens
    "calib32_w4a8_clip": (
        "deepseek_v3_w4a8_clip",
        ["calibration.source=model", "calibration.tokens=32", "calibration.seq_len=32"],
    ),
    "calib2048_w4a8_clip": ("deepseek_v3_w4a8_clip", ["calibration.source=model", "calibration.tokens=2048"]),
}


def fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from quantfw.io.fp8 import quantize_block

    return quantize_block(w, (BLOCK, BLOCK))


class Pool:
    """A few FP8 matrices per shape, reused: generating 11 G random values per layer would take
    longer than the conversion being measured."""

    def __init__(self, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        self.cache: dict[tuple[int, int], list] = {}

    def get(self, n: int, k: int, i: int):
        got = self.cache.setdefault((n, k), [])
        if len(got) < POOL:
            w = torch.randn(n, k, generator=self.g) * 0.02
            w[torch.randint(0, n, (max(1, n // 512),), generator=self.g)] *= 8  # a few outlier rows
            got.append(fp8_block(w))
        return got[i % len(got)]


def layer_tensors(layer: int, moe: bool, pool: Pool):
    """(key, tensor) of one decoder layer in the release's key order, FP8 linears + scale_inv."""
    p = f"model.layers.{layer}"

    def linear(name, n, k, i=0):
        w, s = pool.get(n, k, i)
        yield f"{name}.weight", w
        yield f"{name}.weight_scale_inv", s

    yield f"{p}.input_layernorm.weight", torch.ones(H, dtype=torch.bfloat16)
    yield f"{p}.post_attention_layernorm.weight", torch.ones(H, dtype=torch.bfloat16)
    a = f"{p}.self_attn"
    yield from linear(f"{a}.q_a_proj", Q_LORA, H)
    yield f"{a}.q_a_layernorm.weight", torch.ones(Q_LORA, dtype=torch.bfloat16)
    yield from linear(f"{a}.q_b_proj", HEADS * (NOPE + ROPE), Q_LORA)
    yield from linear(f"{a}.kv_a_proj_with_mqa", KV_LORA + ROPE, H)
    yield f"{a}.kv_a_layernorm.weight", torch.ones(KV_LORA, dtype=torch.bfloat16)
    yield from linear(f"{a}.kv_b_proj", HEADS * (NOPE + V), KV_LORA)
    yield from linear(f"{a}.o_proj", H, HEADS * V)
    m = f"{p}.mlp"
    if not moe:
        yield from linear(f"{m}.gate_proj", I_DENSE, H)
        yield from linear(f"{m}.up_proj", I_DENSE, H)
        yield from linear(f"{m}.down_proj", H, I_DENSE)
        return
    g = torch.Generator().manual_seed(layer)
    yield f"{m}.gate.weight", (torch.randn(E, H, generator=g) * 0.02).bfloat16()
    yield f"{m}.gate.e_score_correction_bias", torch.zeros(E, dtype=torch.float32)
    for e in range(E):
        x = f"{m}.experts.{e}"
        yield from linear(f"{x}.gate_proj", I_MOE, H, 2 * e)
        yield from linear(f"{x}.up_proj", I_MOE, H, 2 * e + 1)
        yield from linear(f"{x}.down_proj", H, I_MOE, e)
    yield from linear(f"{m}.shared_experts.gate_proj", I_MOE, H)
    yield from linear(f"{m}.shared_experts.up_proj", I_MOE, H)
    yield from linear(f"{m}.shared_experts.down_proj", H, I_MOE)


def config(moe_layers: int) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": H,
        "intermediate_size": I_DENSE,
        "moe_intermediate_size": I_MOE,
        "n_routed_experts": E,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "num_hidden_layers": 1 + moe_layers,
        "num_nextn_predict_layers": 0,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "q_lora_rank": Q_LORA,
        "kv_lora_rank": KV_LORA,
        "qk_nope_head_dim": NOPE,
        "qk_rope_head_dim": ROPE,
        "v_head_dim": V,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [BLOCK, BLOCK],
        },
    }


def make_release(folder: Path, moe_layers: int) -> dict:
    """Write the synthetic release (skipped when a complete one is already there)."""
    done = folder / "config.json"
    if done.is_file() and json.loads(done.read_text())["num_hidden_layers"] == 1 + moe_layers:
        return json.loads((folder / "bench_stats.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.safetensors"):
        old.unlink()
    pool, t0 = Pool(), time.perf_counter()
    g = torch.Generator().manual_seed(1)

    def stream():
        yield "model.embed_tokens.weight", (torch.randn(VOCAB, H, generator=g) * 0.02).bfloat16()
        for layer in range(1 + moe_layers):
            yield from layer_tensors(layer, layer >= 1, pool)
        yield "model.norm.weight", torch.ones(H, dtype=torch.bfloat16)
        yield "lm_head.weight", (torch.randn(VOCAB, H, generator=g) * 0.02).bfloat16()

    shards, cur, size, params = [], [], 0, {"fp8": 0, "other": 0}
    for key, t in stream():
        cur.append((key, t))
        size += t.numel() * t.element_size()
        params["fp8" if t.dtype == torch.float8_e4m3fn else "other"] += t.numel()
        if size >= SHARD_BYTES:
            shards.append([k for k, _ in cur])
            write_shard(folder / f"part-{len(shards)}.tmp", cur)
            cur, size = [], 0
    if cur:
        shards.append([k for k, _ in cur])
        write_shard(folder / f"part-{len(shards)}.tmp", cur)
    n, weight_map = len(shards), {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(folder / f"part-{i + 1}.tmp", folder / name)
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    stats = {"bytes": total, "params": params, "shards": n, "write_seconds": time.perf_counter() - t0}
    (folder / "bench_stats.json").write_text(json.dumps(stats))
    done.write_text(json.dumps(config(moe_layers), indent=2))
    return stats


ST_NAMES = {torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float32: "F32"}


def write_shard(path: Path, items: list[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file written tensor by tensor (pool tensors are shared between keys, which
    safetensors' own writer refuses)."""
    header, offset = {}, 0
    for key, t in items:
        n = t.numel() * t.element_size()
        header[key] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for _, t in items:
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_case(src: Path, dst: Path, recipe: str, overrides: list[str], nproc: int | None = None) -> dict:
    """One `quantfw quantize` in a fresh child; wall time, peak RSS, and its stderr stage lines.
    nproc: that many torchrun processes of one thread each (1: one thread on one core), each rank
    timed on its own (peak_rss_mb is then the largest rank's)."""
    cmd = [sys.executable, "-m", "quantfw", "quantize", f"recipe={recipe}", f"input={src}", f"output={dst}"]
    cmd += ["overwrite=true", *overrides]
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    timed, env = [*timer, *cmd], None
    if nproc is not None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if nproc == 1:
            timed = ["taskset", "-c", "0", *timed]
        else:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
            timed = [*launcher, "--master-port", "29731", "--no-python", *timer, *cmd]
    load, t0 = os.getloadavg(), time.perf_counter()
    p = subprocess.run(timed, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    rss = [int(k) / 1024 for k in re.findall(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)]
    return {
        "command": " ".join(timed),
        "exit": p.returncode,
        "seconds": round(wall, 2),
        "peak_rss_mb": round(max(rss), 1) if rss else None,
        "peak_rss_mb_per_rank": [round(r, 1) for r in rss],
        "load_avg_1min": [round(load[0], 1), round(os.getloadavg()[0], 1)],  # before, after
        "stderr_tail": [ln for ln in p.stderr.splitlines() if ln.startswith("quantfw")][-12:],
    }


def main() -> None:
    global E
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="scratch folder for the synthetic release")
    ap.add_argument("--moe-layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cases", nargs="+", default=["minmax_w4a8_clip", "minmax_w8a8"], choices=sorted(CASES))
    ap.add_argument("--experts", type=int, default=256, help="routed experts per MoE layer (fewer: a quick smoke run)")
    ap.add_argument("--cold", action="store_true", help="also run each case after dropping the page cache")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "real_scale.json")
    ap.add_argument("--keep-outputs", action="store_true", help="keep each case's checkpoint (default: deleted after its run)")
    ap.add_argument("--set", nargs="*", default=[], help="extra quantize overrides for every case (key=value)")
    ap.add_argument("--nproc", type=int, help="torchrun processes of one thread each (1: one core)")
    args = ap.parse_args()
    E = args.experts
    rows = []
    for n in args.moe_layers:
        src = args.data / f"release-{n}moe-{E}e"
        stats = make_release(src, n)
        print(f"release with {n} MoE layer(s): {stats['bytes'] / 1e9:.1f} GB, {stats['shards']} shards", flush=True)
        for name in args.cases:
            recipe, extra = CASES[name]
            for cold in [False, True] if args.cold else [False]:
                if cold and not drop_caches():
                    print("cannot drop the page cache here (needs root and /proc/sys/vm): cold runs skipped")
                    continue
                dst = args.data / f"out-{name}-{n}"
                r = run_case(src, dst, recipe, [*extra, *args.set], args.nproc)
                r["load_after"] = os.getloadavg()[0]  # the shared machine's load: times depend on it
                r["output_gb"] = round(sum(p.stat().st_size for p in dst.rglob("*") if p.is_file()) / 1e9, 2)
                if not args.keep_outputs:
                    shutil.rmtree(dst, ignore_errors=True)  # several GB each: one at a time on disk
                r.update(case=name, moe_layers=n, cache="cold" if cold else "warm", input_gb=stats["bytes"] / 1e9)
                r["nproc"] = args.nproc
                r["gparams_per_s"] = round(sum(stats["params"].values()) / 1e9 / r["seconds"], 3)
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "stderr_tail"}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
