"""`llmctl quantize`: the command, lineage and info, reading quantized checkpoints, GPTQ/AWQ quality."""

import json

import pytest
import torch

from conftest import tiny_llama
from llmctl.core.model.io import load_model, save_model
from llmctl.core.quant.config import QuantizeConfig
from llmctl.core.quant.linear import PackedLinear
from llmctl.core.quant.methods import quantize_model

TEXT = ("The quick brown fox jumps over the lazy dog. A cat sat on the mat and looked at the birds. "
        "Hello world, this is a small calibration text about animals, numbers 1 2 3 and colours.\n\n")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("qbase")
    return tiny_llama(out, [TEXT] * 20, vocab=300, context=128)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT * 40)
    return path


def test_round_to_nearest_int8_end_to_end(llmctl, base, tmp_path):
    out = tmp_path / "q8"
    r = llmctl("quantize", base, "-o", out, "--json")
    assert r.code == 0, r.stderr
    result = r.json()
    q = result["quantization"]
    assert (q["method"], q["bits"], q["group_size"], q["symmetric"]) == ("int8", 8, None, True)
    assert q["unquantized"][:2] == ["model.embed_tokens", "lm_head"] and q["error"]["linears"] == 14
    assert 0 < q["error"]["weight_error"] < 1e-3 and "calibration" not in q
    assert result["size_mb"] < result["input_size_mb"]
    info = llmctl("info", out, "--json").json()
    assert info["quantization"]["method"] == "int8" and info["quantization"]["error"]["linears"] == 14
    assert info["lineage"]["command"] == "quantize" and info["lineage"]["parents"][0]["path"] == str(base)
    human = llmctl("info", out)
    assert "quantization method" in human.stderr and "int8" in human.stderr
    # generate reads it with no flag, as a float model of the same weights
    quantized, _ = load_model(out)
    dense, _ = load_model(base)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, PackedLinear):
                dense.get_submodule(name).weight.copy_(module.dequantize())
    save_model(dense, tmp_path / "dequantized", tokenizer_dir=base)
    args = ["-n", "12", "--json", "--ignore-eos"]
    g = llmctl("generate", out, "the cat", *args)
    assert g.code == 0, g.stderr
    assert g.json()["text"] == llmctl("generate", tmp_path / "dequantized", "the cat", *args).json()["text"]
    (tmp_path / "text.txt").write_text(TEXT * 3)
    ppl = llmctl("eval", out, "--task", "perplexity", "--data", tmp_path / "text.txt", "--no-record", "--json")
    assert ppl.code == 0, ppl.stderr


def test_int4_gptq_and_awq_record_their_calibration(llmctl, base, calib, tmp_path):
    common = ["--calibration", calib, "--samples", "4", "--seq-len", "32", "--group-size", "16", "--json"]
    gptq = llmctl("quantize", base, "-m", "gptq", "-o", tmp_path / "g", *common, "gptq.act_order=true")
    assert gptq.code == 0, gptq.stderr
    record = gptq.json()["quantization"]["calibration"]
    assert record["files"] == [str(calib)] and record["samples"] == 4 and len(record["sha256"]) == 64
    lineage = json.loads((tmp_path / "g" / "llmctl.json").read_text())
    assert lineage["config"]["gptq"]["act_order"] is True
    assert lineage["quantization"]["calibration"]["sha256"] == record["sha256"]
    assert 0 < lineage["quantization"]["error"]["output_error"] < 0.1
    awq = llmctl("quantize", base, "-m", "awq", "-o", tmp_path / "a", *common, "--asym", "awq.grid=5", "awq.clip_grid=6")
    assert awq.code == 0, awq.stderr
    assert awq.json()["quantization"]["calibration"]["sha256"] == record["sha256"]  # same seed, same windows
    config = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["symmetric"] is False
    model, _ = load_model(tmp_path / "a")
    assert isinstance(model.model.layers[1].mlp.down_proj, PackedLinear)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()


def test_a_pruned_model_stays_2_4_sparse_through_gptq(llmctl, base, calib, tmp_path):
    assert llmctl("prune", base, "--method", "magnitude", "--pattern", "2:4", "-o", tmp_path / "p").code == 0
    common = ["-m", "gptq", "--calibration", calib, "--samples", "4", "--seq-len", "32", "--group-size", "16", "--json"]
    r = llmctl("quantize", tmp_path / "p", "-o", tmp_path / "q", *common)
    assert r.code == 0, r.stderr
    assert r.json()["sparsity"]["pattern"] == "2:4" and r.json()["sparsity"]["achieved"] >= 0.5
    assert llmctl("info", tmp_path / "q", "--json").json()["sparsity"] == r.json()["sparsity"]
    model, _ = load_model(tmp_path / "q")
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 14
    for m in packed:  # at most 2 nonzero weights in every 4 consecutive inputs
        assert ((m.dequantize() != 0).reshape(-1, 4).sum(-1) <= 2).all()
    lost = llmctl("quantize", tmp_path / "p", "-o", tmp_path / "q2", *common, "gptq.keep_zeros=false")
    assert lost.code == 0 and "2:4 sparsity pattern is lost" in lost.stderr
    assert "pattern" not in lost.json()["sparsity"] and lost.json()["sparsity"]["achieved"] < 0.5
    assert llmctl("quantize", base, "-o", tmp_path / "q3", *common).json()["sparsity"] is None  # a dense parent
    assert llmctl("info", tmp_path / "q3", "--json").json()["sparsity"] is None


@pytest.mark.parametrize("args,code,message", [
    (["-m", "gptq"], 2, "needs --calibration"),
    (["-m", "int4", "--group-size", "48"], 2, "does not divide"),
    (["-m", "int4", "--bits", "3"], 2, "--bits must be 4 or 8"),
    (["-m", "gptqq"], 2, "did you mean 'gptq'"),
    (["-m", "int8", "gptq.dampp=1"], 2, "dampp"),
    (["-m", "int8", "micro_batch=0"], 2, "micro_batch must be at least 1"),
])
def test_usage_errors_are_one_line(llmctl, base, tmp_path, args, code, message):
    r = llmctl("quantize", base, "-o", tmp_path / "out", *args)
    assert r.code == code and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_outputs_follow_the_force_rules(llmctl, base, tmp_path):
    out = tmp_path / "q"
    assert llmctl("quantize", base, "-o", out).code == 0
    assert llmctl("quantize", base, "-o", out).code == 2  # exists
    assert llmctl("quantize", base, "-o", out, "-m", "int4", "--group-size", "16", "--force").code == 0
    assert json.loads((out / "llmctl.json").read_text())["quantization"]["bits"] == 4
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert llmctl("quantize", base, "-o", other, "--force").code == 2  # not a quantize output
    assert (other / "notes.txt").read_text() == "mine"
    again = llmctl("quantize", out, "-o", tmp_path / "twice")
    assert again.code == 2 and "already transformed" in again.stderr


def _logit_error(base, cfg, ids, calibration):
    model, _ = load_model(base)
    quantize_model(model, cfg, calibration)
    dense, _ = load_model(base)
    with torch.no_grad():
        return (model(ids).logits - dense(ids).logits).pow(2).mean().item()


@pytest.fixture(scope="module")
def outlier_base(tmp_path_factory):
    """A tiny model at its initial scale (not a chaotic one where any rounding changes everything)
    with a few large embedding channels: the activation outliers AWQ is for."""
    base = tiny_llama(tmp_path_factory.mktemp("calm"), [TEXT] * 20, vocab=300, context=128, scale=1.0)
    model, _ = load_model(base)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, [3, 17, 29]] *= 8
    return save_model(model, tmp_path_factory.mktemp("outliers") / "m")


@pytest.mark.parametrize("method,options", [("gptq", {}), ("gptq", {"act_order": True}),
                                            ("gptq", {"true_sequential": False}),
                                            ("awq", {"grid": 10, "clip_grid": 10})])
def test_calibrated_methods_beat_round_to_nearest(outlier_base, method, options):
    g = torch.Generator().manual_seed(0)
    calibration = torch.randint(3, 250, (8, 32), generator=g)
    held_out = torch.randint(3, 250, (4, 32), generator=g)
    grid = dict(bits=4, group_size=16, symmetric=True)
    rtn = _logit_error(outlier_base, QuantizeConfig(method="int4", **grid), held_out, None)
    cfg = QuantizeConfig(method=method, **grid)
    for k, v in options.items():
        setattr(getattr(cfg, method), k, v)
    assert _logit_error(outlier_base, cfg, held_out, calibration) < 0.8 * rtn  # measured 0.51-0.58


def test_nf4_method_writes_the_nf4_transform(llmctl, base, tmp_path):
    from llmctl.core.quant.nf4 import NF4Linear, dequantize_nf4, quantize_nf4

    r = llmctl("quantize", base, "-m", "nf4", "-o", tmp_path / "n", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["quantization"]["format"] == "llmctl_nf4 nf4"
    assert json.loads((tmp_path / "n" / "config.json").read_text())["quantization_config"]["quant_method"] == "llmctl_nf4"
    model, _ = load_model(tmp_path / "n")
    dense, _ = load_model(base)
    module = model.model.layers[0].mlp.up_proj
    assert isinstance(module, NF4Linear) and isinstance(model.lm_head, torch.nn.Linear)
    expected = dequantize_nf4(quantize_nf4(dense.model.layers[0].mlp.up_proj.weight))
    assert torch.equal(module.dequantize(), expected)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibration_runs_in_micro_batches_with_the_whole_batch_result(outlier_base, method):
    """No block ever sees more than `micro_batch` windows, and the solution is the one the whole
    batch at once gives (Hessians and input statistics are means over every window either way;
    later layers may differ by float summation order, amplified through the layers before)."""
    calibration = torch.randint(3, 250, (6, 32), generator=torch.Generator().manual_seed(1))
    models, reports, seen = [], [], {6: set(), 4: set()}
    for micro_batch in (6, 4):
        model, _ = load_model(outlier_base)
        handle = model.model.layers[1].register_forward_pre_hook(
            lambda m, args, n=micro_batch: seen[n].add(args[0].shape[0]))
        cfg = QuantizeConfig(method=method, bits=4, group_size=16, symmetric=True, micro_batch=micro_batch)
        cfg.awq.grid = cfg.awq.clip_grid = 5
        reports.append(quantize_model(model, cfg, calibration))
        handle.remove()
        models.append(model)
    assert seen == {6: {6}, 4: {4, 2}}
    first = [m.model.layers[0].self_attn.q_proj.integers() for m in models]
    assert torch.equal(first[0][2], first[1][2])
    torch.testing.assert_close(first[0][0], first[1][0])
    assert reports[1]["output_error"] == pytest.approx(reports[0]["output_error"], rel=0.02)


def _block_outputs(path, ids, cfg=None, calibration=None):
    """Each block's output on `ids` (its input the float model's), after quantizing with `cfg`."""
    model, _ = load_model(path)
    dense, _ = load_model(path)
    if cfg is not None:
        quantize_model(model, cfg, calibration)
    outs = []
    with torch.no_grad():
        hidden, ctx = dense.embed(ids)
        for block, float_block in zip(model.model.layers, dense.model.layers):
            outs.append(block(hidden, ctx)[0])
            hidden = float_block(hidden, ctx)[0]
    return outs


def test_awq_lowers_every_block_output_error_against_round_to_nearest(outlier_base):
    g = torch.Generator().manual_seed(0)
    calibration, held_out = torch.randint(3, 250, (8, 32), generator=g), torch.randint(3, 250, (4, 32), generator=g)
    grid = dict(bits=4, group_size=16, symmetric=True)
    dense = _block_outputs(outlier_base, held_out)
    rtn = _block_outputs(outlier_base, held_out, QuantizeConfig(method="int4", **grid))
    awq = _block_outputs(outlier_base, held_out, QuantizeConfig(method="awq", **grid), calibration)
    for d, r, a in zip(dense, rtn, awq):
        assert (a - d).pow(2).mean() < 0.8 * (r - d).pow(2).mean()


def test_awq_scale_search_minimises_the_error_at_the_module_output(outlier_base):
    """The chosen scale is the grid point with the least mean squared error at the attention's
    output (q/k/v rounded as Q(W·s)/s together), recomputed here directly."""
    from llmctl.core.quant import awq
    from llmctl.core.quant.config import AWQConfig
    from llmctl.core.quant.scheme import Scheme

    model, _ = load_model(outlier_base)
    ids = torch.randint(3, 250, (4, 32), generator=torch.Generator().manual_seed(2))
    attn = model.model.layers[0].self_attn
    calls = []
    handle = attn.register_forward_hook(lambda m, a, k, out: calls.append((a, k, out[0].detach())), with_kwargs=True)
    with torch.no_grad():
        model(ids)
    handle.remove()
    linears = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = calls[0][0][0].reshape(-1, attn.q_proj.in_features)
    scheme, cfg = Scheme(bits=4, group_size=16), AWQConfig(grid=8)
    with torch.no_grad():
        chosen = awq.search_scale(attn, calls, linears, x.abs().mean(0), scheme, cfg)
        w = torch.cat([m.weight for m in linears])
        g = w.reshape(-1, 16).abs()
        w_mean = (g / (g.amax(1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)
        originals = [m.weight.clone() for m in linears]
        errors = []
        for r in range(cfg.grid):
            s = awq.scales(x.abs().mean(0), w_mean, r / cfg.grid)
            for m, w0 in zip(linears, originals):
                m.weight.copy_(scheme.fake(w0 * s) / s)
            errors.append(((attn(*calls[0][0], **calls[0][1])[0] - calls[0][2]).pow(2).mean().item(), s))
            for m, w0 in zip(linears, originals):
                m.weight.copy_(w0)
    best = min(range(cfg.grid), key=lambda r: errors[r][0])
    assert best > 0 and chosen is not None and torch.equal(chosen, errors[best][1])
    assert errors[best][0] < errors[0][0]
    assert all(torch.equal(m.weight, w0) for m, w0 in zip(linears, originals))  # the search left them as they were


@pytest.mark.parametrize("residual,placement,norm", [("parallel", "pre", "layernorm"),
                                                      ("parallel_shared", "pre", "layernorm"),
                                                      ("sequential", "sandwich", "gemma_rmsnorm")])
def test_awq_folds_into_the_norms_before_the_linears(residual, placement, norm):
    """GPT-NeoX's parallel block has a norm per sublayer: AWQ folds into both, as into Gemma 2's
    norms before each sublayer (its norms after them are left alone). Phi-2's one norm feeds
    attention and MLP alike: one scale for q, k, v and fc1 together, judged at the block's output."""
    import copy

    from llmctl.core.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=64, num_heads=4, intermediate_size=128, norm=norm,
                                    mlp="gelu", residual=residual, partial_rotary_factor=0.5,
                                    norm_placement=placement)).eval()
    if placement == "sandwich":  # norms away from 1: (1 + w) folds exactly
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    cfg = QuantizeConfig(method="awq", bits=4, group_size=32, symmetric=True)
    cfg.awq.grid = cfg.awq.clip_grid = 5
    quantize_model(model, cfg, ids)
    for block, before in zip(model.model.layers, dense.model.layers):
        assert not torch.equal(block.input_layernorm.weight, before.input_layernorm.weight)
    if residual == "parallel_shared":
        from llmctl.core.quant.awq import _groups

        block = dense.model.layers[0]
        paths = [f"self_attn.{p}_proj" for p in "qkvo"] + ["mlp.up_proj", "mlp.down_proj"]
        assert _groups(block, paths)[0] == (block.input_layernorm, [*paths[:3], "mlp.up_proj"])
        if placement == "sandwich":
            assert not torch.equal(block.post_attention_layernorm.weight, before.post_attention_layernorm.weight)
            assert torch.equal(block.attn_out_norm.weight, before.attn_out_norm.weight)
    with torch.no_grad():
        a, b = model(ids).logits, dense(ids).logits
    assert (a - b).pow(2).mean() < 0.05 * b.pow(2).mean()
