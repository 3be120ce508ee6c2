"""transformers-5 plumbing on tiny random Mixtral / Qwen3-MoE / DeepSeek-V3 models."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from quantfw.errors import ConfigError
from quantfw.moe import FloatMoE

tf = pytest.importorskip("transformers")
from quantfw.integrations.hf import (  # noqa: E402
    ARCHS,
    SwappedMoEBlock,
    extract_expert_weights,
    find_moe_blocks,
    make_router,
    save_tiny_checkpoint,
    swap_moe_experts,
    tiny_moe_model,
)

E, I, H = 8, 256, 512
MOE_LAYERS = {"mixtral": [0, 1], "qwen3_moe": [0, 1], "deepseek_v3": [1]}


def _float_factory(w13, w2, layer_index):
    return FloatMoE(w13, w2)


def _tokens(seed=0):
    return torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_find_moe_blocks(arch):
    model = tiny_moe_model(arch)
    blocks = find_moe_blocks(model)
    assert [b[0] for b in blocks] == MOE_LAYERS[arch]
    for layer, path, info in blocks:
        assert path == f"model.layers.{layer}.mlp"
        assert (info.num_experts, info.top_k, info.hidden_size, info.intermediate_size) == (E, 2, H, I)
        assert info.experts_layout == "fused"
        assert info.has_shared_experts == (arch == "deepseek_v3")
        if arch == "deepseek_v3":
            assert info.routing == "grouped_topk_sigmoid"
            assert (info.n_group, info.topk_group, info.routed_scaling_factor) == (4, 2, 2.5)
            assert info.has_correction_bias and info.renormalize
        else:
            assert info.routing == "softmax_topk" and info.renormalize


@pytest.mark.parametrize("arch", ARCHS)
def test_router_reproduces_transformers_routing(arch):
    model = tiny_moe_model(arch)
    for _, path, _ in find_moe_blocks(model):
        block = model.get_submodule(path)
        x = torch.randn(300, H, generator=torch.Generator().manual_seed(3))
        _, ref_w, ref_ids = block.gate(x)
        w, ids = make_router(block)(x)
        order_ref, order = torch.argsort(ref_ids, 1), torch.argsort(ids, 1)
        assert torch.equal(ref_ids.gather(1, order_ref), ids.gather(1, order))
        torch.testing.assert_close(w.gather(1, order), ref_w.float().gather(1, order_ref), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_swap_with_float_experts_reproduces_logits(arch):
    model = tiny_moe_model(arch)
    x = _tokens()
    with torch.no_grad():
        ref = model(x).logits
    report = swap_moe_experts(model, _float_factory)
    assert [e.layer_index for e in report.entries] == MOE_LAYERS[arch]
    assert all(isinstance(model.get_submodule(e.path), SwappedMoEBlock) for e in report.entries)
    assert all(isinstance(model.get_submodule(e.path).experts, FloatMoE) for e in report.entries)
    assert "FloatMoE" in str(report)
    assert find_moe_blocks(model) == []
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=0)
    with torch.no_grad():  # transformers still records the router logits through the kept gate
        recorded = model(x, output_router_logits=True).router_logits
    assert len(recorded) == len(MOE_LAYERS[arch])


@pytest.mark.parametrize("arch", ARCHS)
def test_swap_actually_uses_the_factory(arch):
    model = tiny_moe_model(arch)
    x = _tokens()
    with torch.no_grad():
        ref = model(x).logits
    seen = []

    def zero_factory(w13, w2, layer_index):
        seen.append((layer_index, tuple(w13.shape), tuple(w2.shape), w13.dtype))
        return FloatMoE(w13, torch.zeros_like(w2))

    swap_moe_experts(model, zero_factory)
    assert seen == [(i, (E, 2 * I, H), (E, H, I), torch.float32) for i in MOE_LAYERS[arch]]
    with torch.no_grad():
        assert (model(x).logits - ref).abs().max() > 1e-3


def test_extract_per_expert_layouts_match_fused():
    model = tiny_moe_model("mixtral")
    block = model.model.layers[0].mlp
    w13, w2 = extract_expert_weights(block)
    assert torch.equal(w13, block.experts.gate_up_proj) and torch.equal(w2, block.experts.down_proj)
    assert w13.data_ptr() != block.experts.gate_up_proj.data_ptr()  # a copy

    for names in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
        experts = nn.ModuleList()
        for e in range(E):
            expert = nn.Module()
            for name, weight in zip(names, (w13[e, :I], w13[e, I:], w2[e])):
                lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                lin.weight.data.copy_(weight)
                setattr(expert, name, lin)
            experts.append(expert)
        a, b = extract_expert_weights(experts)
        assert torch.equal(a, w13) and torch.equal(b, w2)


def test_swap_rejects_models_without_moe_blocks():
    with pytest.raises(ConfigError, match="no MoE blocks"):
        swap_moe_experts(nn.Sequential(nn.Linear(4, 4)), _float_factory)


def test_tiny_model_is_deterministic():
    a, b = tiny_moe_model("qwen3_moe", seed=1), tiny_moe_model("qwen3_moe", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ConfigError, match="allowed"):
        tiny_moe_model("llama")


ON_DISK = {
    "mixtral": ("block_sparse_moe", ["gate.weight"], ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp", ["gate.weight"], ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v3": (
        "mlp",
        ["gate.weight", "gate.e_score_correction_bias"]
        + [f"shared_experts.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")],
        ("gate_proj", "up_proj", "down_proj"),
    ),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_keys_on_disk_are_per_expert(arch, tmp_path):
    save_tiny_checkpoint(arch, tmp_path)
    model = tiny_moe_model(arch)
    prefix, extra, (gate, up, down) = ON_DISK[arch]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert not any("gate_up_proj" in k or k.endswith("experts.down_proj") for k in keys)
        for layer in MOE_LAYERS[arch]:
            base = f"model.layers.{layer}.{prefix}"
            for name in extra:
                assert f"{base}.{name}" in keys
            fused = model.get_submodule(f"model.layers.{layer}.mlp.experts")
            for e in range(E):
                g, u, d = (f.get_tensor(f"{base}.experts.{e}.{n}.weight") for n in (gate, up, down))
                assert g.shape == u.shape == (I, H) and d.shape == (H, I)
                assert torch.equal(torch.cat([g, u]), fused.gate_up_proj[e])
                assert torch.equal(d, fused.down_proj[e])
            assert f"{base}.experts.{E}.{gate}.weight" not in keys
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == arch
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    x = _tokens(1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, atol=0, rtol=0)
