"""Layer-by-layer calibration (calibration.layerwise, the default) against the whole-model path."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from checkpoint_helpers import cli
from omegaconf import OmegaConf

import quantfw.calibrate.layerwise as layerwise
from quantfw.api import components
from quantfw.calibrate.decoder import SUPPORTED_MODEL_TYPES, DecoderStack
from quantfw.calibrate.model import calibrate_checkpoint, load_float_model
from quantfw.config.compose import compose
from quantfw.errors import ConfigError
from quantfw.integrations.hf import _transformers, save_tiny_checkpoint, swap_moe_experts
from quantfw.io.experts import MoEModel, read_float_experts
from quantfw.io.reader import CheckpointReader
from quantfw.moe.reference import FloatMoE
from quantfw.quantize.checkpoint import quantize_checkpoint

CLIP = ["scheme=w4a8_clip", "format=compressed_tensors"]
GPTQ = ["scheme=w4a8", "scheme.group_size=0", "format=msmodelslim", "scheme.weight_observer=gptq"]


def calib(**kw):
    base = dict(tokens=512, seq_len=64, batch_size=4, min_tokens=16, policy="ones", max_rows=96)
    return OmegaConf.create({**base, "progress": False, "expert_block": 3, **kw})


@pytest.fixture(scope="module")
def floats(tmp_path_factory):
    root = tmp_path_factory.mktemp("float")
    return {
        a: save_tiny_checkpoint(a, root / a, seed=5, num_layers=3)
        for a in ("qwen3_moe", "deepseek_v3", "mixtral")
    }


def scheme_fmt(overrides):
    scheme, fmt, _ = components(compose("default", overrides))
    return scheme, fmt


def tensors(folder):
    r = CheckpointReader(folder)
    return {k: r.get(k) for k in r.keys()}


def assert_same_checkpoint(a, b):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def quantize(src, dst, overrides, result):
    scheme, fmt = scheme_fmt(overrides)
    return quantize_checkpoint(
        src,
        dst,
        scheme,
        fmt,
        progress=False,
        calibration=result,
    )


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "mixtral"])
def test_layerwise_alphas_and_checkpoint_equal_the_whole_model_path(arch, floats, tmp_path):
    src = floats[arch]
    scheme, _ = scheme_fmt(CLIP)
    whole = calibrate_checkpoint(src, scheme, calib(layerwise=False))
    layer = calibrate_checkpoint(src, scheme, calib(), work_dir=tmp_path / "work")
    assert sorted(layer.alphas) == sorted(whole.alphas) == ([1, 2] if arch == "deepseek_v3" else [0, 1, 2])
    for L, a in whole.alphas.items():
        assert torch.equal(layer.alphas[L], a), L  # bit-identical
    assert any((a < 1).any() for a in layer.alphas.values())
    assert layer.report == whole.report and layer.metadata == whole.metadata and layer.data == whole.data
    assert_same_checkpoint(
        quantize(src, tmp_path / "whole", CLIP, whole), quantize(src, tmp_path / "layer", CLIP, layer)
    )


@pytest.mark.parametrize("all_experts", [False, True])
def test_layerwise_observer_inputs_and_gptq_weights_equal_the_whole_model_path(all_experts, floats, tmp_path):
    src = floats["qwen3_moe"]
    scheme, _ = scheme_fmt(GPTQ)
    c = dict(all_experts=all_experts, max_rows=200)
    whole = calibrate_checkpoint(src, scheme, calib(layerwise=False, **c))
    layer = calibrate_checkpoint(src, scheme, calib(**c), work_dir=tmp_path / "work")
    assert layer.data == whole.data and not layer.alphas
    for L in whole.inputs:
        for e in range(8):
            for role in ("w13", "w2"):
                a, b = whole.inputs[L](role, e), layer.inputs[L](role, e)
                assert (a is None and b is None) or torch.equal(a, b), (L, e, role)
    assert_same_checkpoint(
        quantize(src, tmp_path / "whole", GPTQ, whole), quantize(src, tmp_path / "layer", GPTQ, layer)
    )


def test_all_experts_every_expert_sees_every_token_outputs_stay_routed(floats, tmp_path):
    src = floats["qwen3_moe"]
    scheme, _ = scheme_fmt(GPTQ)
    routed = calibrate_checkpoint(src, scheme, calib(max_rows=None), work_dir=tmp_path / "a")
    every = calibrate_checkpoint(src, scheme, calib(max_rows=None, all_experts=True), work_dir=tmp_path / "b")
    tokens = 512
    assert every.data["all_experts"] is True and "all_experts" not in routed.data
    assert all(r == [tokens] * 8 for r in every.data["rows"].values())  # every expert, every token
    # coverage counts routed tokens only, and matches the routed run at every layer: the hidden
    # states each layer received (hence its routing) did not change
    assert every.data["coverage"] == routed.data["coverage"]
    assert all(sum(c) == tokens * 2 for c in every.data["coverage"].values())  # top-2
    assert routed.data["rows"] == routed.data["coverage"]
    for L in (1, 2):
        x_all = every.inputs[L]("w13", 0)
        assert x_all.shape[0] == tokens
        n = 0
        for e in range(8):
            x = routed.inputs[L]("w13", e)
            n += 0 if x is None else x.shape[0]
            assert x is None or (x.unsqueeze(1) == x_all.unsqueeze(0)).all(-1).any(1).all()
        assert n == tokens * 2


def test_killed_run_resumes_at_the_first_unfinished_layer_byte_identical(floats, tmp_path, monkeypatch):
    src = floats["qwen3_moe"]
    scheme, _ = scheme_fmt(CLIP)
    work = tmp_path / "work"

    def kill(i):
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(layerwise, "AFTER_LAYER", kill)
    with pytest.raises(KeyboardInterrupt):
        calibrate_checkpoint(src, scheme, calib(), work_dir=work)
    ran = []
    monkeypatch.setattr(layerwise, "AFTER_LAYER", ran.append)
    resumed = calibrate_checkpoint(src, scheme, calib(progress=True), work_dir=work)
    assert ran == [2]  # layers 0 and 1 came from the work dir
    fresh = calibrate_checkpoint(src, scheme, calib(), work_dir=tmp_path / "fresh")
    assert ran == [2, 0, 1, 2]
    a, b = (
        quantize(src, tmp_path / "resumed", CLIP, resumed),
        quantize(src, tmp_path / "fresh_q", CLIP, fresh),
    )
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # a file that fails its checksum is not trusted: the run starts over
    hidden = sorted(work.glob("hidden-0002-*.safetensors"))[0]
    hidden.write_bytes(hidden.read_bytes()[:-4] + b"xxxx")
    ran.clear()
    again = calibrate_checkpoint(src, scheme, calib(), work_dir=work)
    assert ran == [0, 1, 2]
    assert all(torch.equal(again.alphas[L], fresh.alphas[L]) for L in fresh.alphas)


def test_progress_one_line_per_layer_and_off(floats, tmp_path, capsys):
    src = floats["deepseek_v3"]
    scheme, _ = scheme_fmt(GPTQ)
    calibrate_checkpoint(src, scheme, calib(progress=True), work_dir=tmp_path / "a")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("quantfw calibrate: layer")]
    assert [ln.split(":")[1].split()[1] for ln in lines] == ["1/3", "2/3", "3/3"]
    assert (
        "0 experts" in lines[0] and "8 experts" in lines[1] and "ETA" in lines[2] and "experts/s" in lines[2]
    )
    # seconds per stage: the dense layer has no expert stages, a MoE layer has them
    assert "layer forward" in lines[0] and "experts forward" not in lines[0]
    assert all(s in lines[1] for s in ("read+dequant", "experts forward", "write"))
    calibrate_checkpoint(src, scheme, calib(progress=False), work_dir=tmp_path / "b")
    assert "quantfw calibrate: layer" not in capsys.readouterr().err


def test_hidden_states_over_the_budget_stay_on_disk_same_result(floats, tmp_path):
    src = floats["mixtral"]
    scheme, _ = scheme_fmt(GPTQ)
    ram = calibrate_checkpoint(src, scheme, calib(), work_dir=tmp_path / "a")
    disk = calibrate_checkpoint(src, scheme, calib(memory_budget_mb=0), work_dir=tmp_path / "b")
    assert (tmp_path / "b" / "embeds-0000.safetensors").is_file()
    assert not (tmp_path / "a" / "embeds-0000.safetensors").exists()
    for L in ram.inputs:
        assert torch.equal(ram.inputs[L]("w2", 3), disk.inputs[L]("w2", 3))


def test_guard_skipped_in_one_line_and_recorded(floats, tmp_path, capsys):
    scheme, fmt, backend = components(compose("default", CLIP))
    res = calibrate_checkpoint(
        floats["qwen3_moe"], scheme, calib(guard_tokens=128), fmt=fmt, backend=backend, work_dir=tmp_path
    )
    err = [ln for ln in capsys.readouterr().err.splitlines() if "guard" in ln]
    assert len(err) == 1 and "skipped" in err[0] and "whole model" in err[0]
    assert "skipped" in res.metadata["guard"] and res.metadata["calibration_tokens"] == 512


def test_bad_model_type_and_propagate_are_one_line_errors(floats, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(floats["qwen3_moe"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "llama4_text"
    (bad / "config.json").write_text(json.dumps(cfg))
    scheme, _ = scheme_fmt(CLIP)
    with pytest.raises(
        ConfigError, match=r"model_type='llama4_text' has no known decoder layer.*deepseek_v3"
    ):
        calibrate_checkpoint(bad, scheme, calib())
    with pytest.raises(ConfigError, match="calibration.propagate=quantized"):
        calibrate_checkpoint(
            floats["qwen3_moe"], scheme, calib(propagate="quantized"), work_dir=tmp_path / "w"
        )
    r = cli("quantize", f"input={bad}", f"output={tmp_path / 'q'}", *CLIP, "calibration.source=model")
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("quantfw quantize: error:")]
    assert r.returncode == 2 and len(err) == 1 and "supported: " in err[0], r.stderr
    assert not (tmp_path / ".q.calibration").exists()


def test_cli_removes_the_work_dir_after_success(floats, tmp_path):
    out = tmp_path / "q"
    r = cli(
        "quantize",
        f"input={floats['deepseek_v3']}",
        f"output={out}",
        *GPTQ,
        "calibration.source=model",
        "calibration.tokens=256",
        "calibration.seq_len=64",
    )
    assert r.returncode == 0, r.stderr
    assert "quantfw calibrate: layer 3/3" in r.stderr
    assert (out / "quant_model_description.json").is_file() and not (tmp_path / ".q.calibration").exists()


# ---------------------------------------------------------------- every supported model type


def _tiny_extra_config(model_type):
    tf = _transformers()
    common = dict(
        vocab_size=300,
        hidden_size=128,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        first_k_dense_replace=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if model_type == "glm4_moe":
        return tf.Glm4MoeConfig(**common, head_dim=32)
    return tf.DeepseekV32Config(
        **common,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        index_topk=16,
        index_head_dim=32,
        index_n_heads=2,
    )


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_decoder_stack_reproduces_the_model_for_every_supported_type(model_type, floats, tmp_path):
    """Layer by layer through transformers' own decoder layers == the model's own forward, bit for bit."""
    if model_type in floats:
        src = floats[model_type]
    else:
        tf = _transformers()
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(_tiny_extra_config(model_type), dtype=torch.float32)
        src = tmp_path / model_type
        model.save_pretrained(src, safe_serialization=True)
    reader = CheckpointReader(src)
    assert reader.config()["model_type"] == model_type
    moe = MoEModel.from_config(reader.config(), "config.json")
    stack = DecoderStack(src, reader, lambda L: FloatMoE(*read_float_experts(reader, moe, L)))
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    h = stack.embed(ids)
    args = stack.layer_inputs(h)
    for i in range(len(stack)):
        layer = stack.materialize(i)
        with torch.no_grad():
            h = layer(h, *args[i][0], **args[i][1])
        stack.free(i)
        assert all(p.is_meta for p in stack.layers[i].parameters())
    model = load_float_model(src)
    swap_moe_experts(model, lambda w13, w2, _L: FloatMoE(w13, w2))
    seen = []
    model.model.norm.register_forward_hook(lambda _m, a, _o: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert torch.equal(seen[0], h)


def test_conf_models_are_supported():
    from pathlib import Path

    conf = Path(__file__).parent.parent / "conf" / "model"
    types = {OmegaConf.load(p).get("hf_model_type") for p in conf.glob("*.yaml")} - {None, ""}
    assert types and types <= set(SUPPORTED_MODEL_TYPES)


# ---------------------------------------------------------------- memory


PEAK = textwrap.dedent(
    """
    import sys
    from omegaconf import OmegaConf
    from quantfw.api import components
    from quantfw.calibrate.model import calibrate_checkpoint
    from quantfw.config.compose import compose
    scheme = components(compose("default", sys.argv[3:]))[0]
    c = dict(tokens=256, seq_len=64, batch_size=4, min_tokens=16, policy="ones", max_rows=64,
             progress=False, expert_block=4)
    calibrate_checkpoint(sys.argv[1], scheme, OmegaConf.create(c), work_dir=sys.argv[2])
    # VmHWM: peak RSS of this process image (ru_maxrss would carry over the forking parent's)
    hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
    print(int(hwm.split()[1]) * 1024)
    """
)


def test_peak_memory_does_not_grow_with_the_number_of_layers(tmp_path):
    dims = dict(hidden_size=512, moe_intermediate_size=512, num_experts=32, vocab_size=256)
    layer_bytes = 32 * 3 * 512 * 512 * 4  # one layer's routed experts in fp32: 100 MB
    peaks = {}
    for n in (2, 6):
        src = save_tiny_checkpoint("qwen3_moe", tmp_path / f"m{n}", seed=1, num_layers=n, **dims)
        r = subprocess.run(
            [sys.executable, "-c", PEAK, str(src), str(tmp_path / f"w{n}"), *GPTQ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr
        peaks[n] = int(r.stdout.split()[-1])
    # the whole model would add 4 layers' experts (twice: model + extracted copies), > 800 MB
    assert peaks[6] - peaks[2] < layer_bytes, peaks


def sequential_whole_model_alphas(src, scheme, fmt, backend, c):
    """GPTQ-style reference on the whole model: learn layer L's alphas with the layers before it
    already running their quantized experts, then swap layer L's quantized experts in."""
    from quantfw.calibrate.experts import ExpertCapture, learn_expert_alphas
    from quantfw.calibrate.model import calibration_tokens
    from quantfw.layout.spec import Dims
    from quantfw.moe.layer import MoELayer
    from quantfw.quantize.experts import quantize_experts

    model = load_float_model(src)
    weights = {}

    def factory(w13, w2, layer):
        weights[layer] = (w13, w2)
        return FloatMoE(w13, w2)

    path = {e.layer_index: e.path for e in swap_moe_experts(model, factory).entries}
    ids, _ = calibration_tokens(src, model.config.vocab_size, c.tokens, 0, seq_len=c.seq_len)
    windows = ids.view(-1, c.seq_len)
    alphas = {}
    for L in sorted(path):
        w13, w2 = weights[L]
        cap = ExpertCapture({L: (model.get_submodule(path[L]).experts, w13)}, max_rows=c.max_rows)
        with torch.no_grad(), cap.attached():
            for i in range(0, len(windows), c.batch_size):
                model(input_ids=windows[i : i + c.batch_size], use_cache=False)
        alphas[L], _ = learn_expert_alphas(scheme, w13, w2, cap.layers[L], c.min_tokens, c.policy)
        dims = Dims(E=w13.shape[0], H=w13.shape[2], I=w13.shape[1] // 2)
        layer = MoELayer(scheme, fmt, backend, dims).load(
            quantize_experts(scheme, fmt, w13, w2, alphas[L], log=None)
        )
        model.get_submodule(path[L]).experts = layer
    return alphas


def test_propagate_quantized_feeds_the_next_layer_quantized_outputs(floats, tmp_path):
    src = floats["qwen3_moe"]
    scheme, fmt, backend = components(compose("default", CLIP))
    c = calib(propagate="quantized", expert_block=8)  # one block: the reference's summation order
    seq = calibrate_checkpoint(src, scheme, c, fmt=fmt, backend=backend, work_dir=tmp_path / "q")
    flt = calibrate_checkpoint(src, scheme, calib(), fmt=fmt, backend=backend, work_dir=tmp_path / "f")
    ref = sequential_whole_model_alphas(src, scheme, fmt, backend, c)
    assert sorted(seq.alphas) == sorted(ref) == [0, 1, 2]
    for L in ref:
        assert torch.equal(seq.alphas[L], ref[L]), L
    # layer 0 sees the embeddings either way; the next layers see the quantized experts' outputs
    assert torch.equal(seq.inputs[0]("w13", 0), flt.inputs[0]("w13", 0))
    for L in (1, 2):
        a, b = seq.inputs[L]("w13", 0), flt.inputs[L]("w13", 0)
        assert a.shape != b.shape or not torch.equal(a, b), L
    # blocks of 3 experts sum the same outputs in another order: the same up to rounding
    blocked = calibrate_checkpoint(
        src, scheme, calib(propagate="quantized"), fmt=fmt, backend=backend, work_dir=tmp_path / "b"
    )
    x, y = blocked.inputs[2]("w13", 1), seq.inputs[2]("w13", 1)
    assert x.shape == y.shape and torch.allclose(x, y, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="calibration.propagate=sideways"):
        calibrate_checkpoint(src, scheme, calib(propagate="sideways"), fmt=fmt, backend=backend)


def with_mtp(src, dst):
    """`src` (tiny DeepSeek-V3, layers 0-2) plus the MTP layer 3 in the release's key names: a
    copy of MoE layer 2 scaled, eh_proj, enorm, hnorm, shared_head."""
    from safetensors.torch import load_file, save_file

    t = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(11)
    for k in [k for k in t if k.startswith("model.layers.2.")]:
        t[k.replace("layers.2.", "layers.3.")] = t[k] * 1.5
    norm = t["model.norm.weight"]
    H, p = norm.shape[0], "model.layers.3."
    t[p + "eh_proj.weight"] = (torch.randn(H, 2 * H, generator=g) * 0.1).to(norm.dtype)
    t[p + "enorm.weight"] = (1 + 0.1 * torch.randn(H, generator=g)).to(norm.dtype)
    t[p + "hnorm.weight"] = (1 + 0.1 * torch.randn(H, generator=g)).to(norm.dtype)
    t[p + "shared_head.norm.weight"] = norm.clone()
    dst.mkdir()
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    return dst


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_mtp_layer_gets_learned_alphas_from_the_main_models_last_hidden_states(floats, tmp_path):
    src = with_mtp(floats["deepseek_v3"], tmp_path / "mtp")
    scheme, fmt, backend = components(compose("default", CLIP))
    res = calibrate_checkpoint(
        src, scheme, calib(), fmt=fmt, backend=backend, work_dir=tmp_path / "w", mtp="quantize"
    )
    assert sorted(res.alphas) == [1, 2, 3]
    rows = [r for r in res.report if r["layer"] == 3]
    assert len(rows) == 8 and any(r["status"] == "learned" for r in rows)
    assert (res.alphas[3] < 1).any()
    top_k = json.loads((src / "config.json").read_text())["num_experts_per_tok"]
    assert sum(res.data["coverage"]["3"]) == 8 * 63 * top_k  # 8 windows, S-1 positions each
    dropped = calibrate_checkpoint(src, scheme, calib(), fmt=fmt, backend=backend, work_dir=tmp_path / "d")
    assert sorted(dropped.alphas) == [1, 2]
    for L in (1, 2):  # the main layers do not depend on the MTP layer
        assert torch.equal(dropped.alphas[L], res.alphas[L])
    # the learned MTP alphas reach the checkpoint: only layer 3's experts differ from alpha = 1
    a = tensors(quantize(src, tmp_path / "q", CLIP, res))
    b = tensors(quantize(src, tmp_path / "q1", CLIP, dropped))
    differ = {k for k in a if not torch.equal(a[k], b[k])}
    assert differ and all(k.startswith("model.layers.3.mlp.experts") for k in differ), sorted(differ)[:3]
    # the MTP input against its formula on the whole float model's final (normed) hidden states
    model = load_float_model(src)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    seen = {}
    model.model.norm.register_forward_hook(lambda _m, args, out: seen.update(pre=args[0], post=out))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    stack = DecoderStack(
        src, CheckpointReader(src), lambda i: FloatMoE(torch.zeros(1, 2, 1), torch.zeros(1, 1, 1)), mtp=True
    )
    got = stack.mtp_input(3, ids, seen["pre"])
    r = CheckpointReader(src)
    eps = model.config.rms_norm_eps
    e = rms(model.model.embed_tokens(ids[:, 1:]), r.get("model.layers.3.enorm.weight"), eps)
    h = rms(seen["post"][:, :-1], r.get("model.layers.3.hnorm.weight"), eps)
    want = torch.cat([e, h], -1) @ r.get("model.layers.3.eh_proj.weight").T
    assert got.shape == (2, 15, seen["pre"].shape[-1]) and torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_alpha_search_rows_spilled_to_the_work_dir_give_the_same_alphas(floats, tmp_path, monkeypatch):
    import quantfw.calibrate.row_store as row_store

    src = floats["qwen3_moe"]
    scheme, _ = scheme_fmt(CLIP)
    held = calibrate_checkpoint(src, scheme, calib(), work_dir=tmp_path / "a")
    spilled = []
    keep = row_store.RowStore.keep

    def spy(self, e, rows):
        out = keep(self, e, rows)
        spilled.append(isinstance(out, row_store.SpilledRows) and out.path.is_file())
        return out

    monkeypatch.setattr(row_store.RowStore, "keep", spy)
    disk = calibrate_checkpoint(src, scheme, calib(search_memory_mb=0), work_dir=tmp_path / "b")
    assert spilled and all(spilled)  # every searched expert waited in a file
    assert not list((tmp_path / "b" / row_store.FOLDER).glob("*"))  # removed after each search
    assert any((a < 1).any() for a in held.alphas.values())
    for L, a in held.alphas.items():
        assert torch.equal(disk.alphas[L], a), L
    assert disk.report == held.report
