"""llmctl prune: masks, the methods' quality on a layer, the command end to end, structured
checkpoints that transformers loads with llmctl's logits, and keep_sparsity in training."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from conftest import silence, tiny_llama  # noqa: E402

from llmctl.core.prune import PRUNERS, PruneConfig  # noqa: E402
from llmctl.core.prune.masks import nm_mask, parse_pattern, topk_mask  # noqa: E402
from llmctl.errors import UsageError  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while seven cats sleep under warm red roofs".split()
CAL = ["seq_len=32", "samples=16"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny GQA Llama (4 heads, 2 KV groups, 2 layers) and text to calibrate and evaluate on."""
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(120)]
    root = tmp_path_factory.mktemp("prune")
    ckpt = root / "base"
    ckpt.mkdir()
    tiny_llama(ckpt, texts, vocab=300, context=64, scale=4.0)
    (root / "text.txt").write_text("\n\n".join(texts))
    (root / "heldout.txt").write_text("\n\n".join(texts[:12]))
    return ckpt, root / "text.txt"


# ------------------------------------------------------------------------------------------ masks


def test_masks_have_exact_sparsity_and_valid_nm_groups():
    scores = torch.randn(24, 48)
    assert int((~topk_mask(scores, 0.3)).sum()) == int(24 * 48 * 0.3)
    rows = topk_mask(scores, 0.5, dim=-1)
    assert (rows.sum(1) == 24).all()
    lowest_kept = scores.masked_fill(~rows, float("inf")).min(1).values
    assert (lowest_kept >= scores.masked_fill(rows, float("-inf")).max(1).values).all()  # the largest are kept
    ties = torch.zeros(4, 8)  # all scores tied: still exactly half per row
    assert (topk_mask(ties, 0.5, dim=-1).sum(1) == 4).all()
    for n, m in [(2, 4), (4, 8), (1, 3)]:
        mask = nm_mask(scores[:, : 48 // m * m], n, m)
        assert (mask.view(24, -1, m).sum(-1) == n).all()
    with pytest.raises(UsageError):
        nm_mask(torch.randn(4, 10), 2, 4)
    for bad in ("2", "4:2", "a:b", "0:4"):
        with pytest.raises(UsageError):
            parse_pattern(bad)


def _layer_error(method: str, linear: nn.Linear, x: torch.Tensor, **settings) -> float:
    """Output error ‖XWᵀ − XŴᵀ‖ after pruning `linear` alone with `method` on inputs `x`."""
    pruner = PRUNERS.get(method)(PruneConfig(method=method, **settings))
    pruned = nn.Linear(linear.in_features, linear.out_features, bias=False)
    pruned.weight.data.copy_(linear.weight.data)
    stats = pruner.Stats(pruned) if pruner.calibrated else None
    if stats is not None:
        stats.add(x)
    pruner.prune_linear(pruned, stats)
    with torch.no_grad():
        return float((linear(x) - pruned(x)).norm() / linear(x).norm())


@pytest.mark.parametrize("settings", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_calibrated_methods_beat_magnitude_on_a_layer(settings):
    """Inputs with a few large features (as in LLMs): Wanda's error is well below magnitude's,
    SparseGPT's (which also updates the weights it keeps) below Wanda's."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    scale = torch.ones(64)
    scale[torch.randperm(64)[:6]] = 20.0
    x = torch.randn(256, 64) * scale
    magnitude = _layer_error("magnitude", linear, x, **settings)
    wanda = _layer_error("wanda", linear, x, **settings)
    sparsegpt = _layer_error("sparsegpt", linear, x, block_size=16, **settings)
    assert sparsegpt < wanda < 0.8 * magnitude, (sparsegpt, wanda, magnitude)


def _reference_sparsegpt_nm(weight, hessian, n_zero, m, block_size, percdamp=0.01):
    """SparseGPT's `fasterprune` for N:M (IST-DASLab/sparsegpt, sparsegpt.py), transcribed."""
    W, H = weight.clone().float(), hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += torch.eye(len(H)) * percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, W.shape[1], block_size):
        i2 = min(i1 + block_size, W.shape[1])
        W1, Q1, Err1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), torch.zeros(W.shape[0], i2 - i1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1) == 1
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if i % m == 0:
                tmp = W1[:, i:i + m] ** 2 / torch.diag(Hinv1)[i:i + m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, n_zero, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def test_sparsegpt_matches_the_reference_and_keeps_exact_counts():
    torch.manual_seed(1)
    linear = nn.Linear(48, 16, bias=False)
    x = torch.randn(128, 48) * torch.rand(48) * 3
    pruner = PRUNERS.get("sparsegpt")(PruneConfig(method="sparsegpt", pattern="2:4", block_size=16))
    stats = pruner.Stats(linear)
    stats.add(x)
    want = _reference_sparsegpt_nm(linear.weight.data, stats.matrix, 2, 4, 16)
    pruner.prune_linear(linear, stats)
    torch.testing.assert_close(linear.weight.data, want, rtol=1e-5, atol=1e-6)
    assert ((linear.weight != 0).view(16, -1, 4).sum(-1) == 2).all()
    unstructured = PRUNERS.get("sparsegpt")(PruneConfig(method="sparsegpt", sparsity=0.6, block_size=16))
    other = nn.Linear(48, 16, bias=False)
    stats = unstructured.Stats(other)
    stats.add(x)
    unstructured.prune_linear(other, stats)
    assert ((other.weight == 0).view(16, 3, 16).sum((0, 2)) == int(16 * 16 * 0.6)).all()  # per block of columns


def _reference_wanda(model, tokens, sparsity=0.5, prune_n=0, prune_m=0):
    """Wanda's `prune_wanda` (locuslab/wanda, lib/prune.py + lib/layerwrapper.py), transcribed:
    one sample at a time through each layer, the running mean of ‖x_j‖² per input feature from
    every token (hooks on the layer's linears), |W|·sqrt(that) compared per output row (or per M
    consecutive inputs of a row), then the layer re-run pruned to give the next layer's inputs."""
    samples = [model.embed(tokens[j:j + 1]) for j in range(len(tokens))]
    hidden, ctxs = [h for h, _ in samples], [c for _, c in samples]
    for layer in model.model.layers:
        subset = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        scaler = {n: torch.zeros(m.in_features) for n, m in subset.items()}
        seen = dict.fromkeys(subset, 0)

        def add_batch(name):
            def hook(_module, inp, _out):
                inp = inp[0]
                tmp = inp.shape[0]
                inp = inp.reshape(-1, inp.shape[-1]).t().float()
                scaler[name] *= seen[name] / (seen[name] + tmp)
                seen[name] += tmp
                scaler[name] += torch.norm(inp, p=2, dim=1) ** 2 / seen[name]
            return hook

        handles = [m.register_forward_hook(add_batch(n)) for n, m in subset.items()]
        for h, ctx in zip(hidden, ctxs):
            layer(h, ctx)
        for handle in handles:
            handle.remove()
        for name, m in subset.items():
            metric = m.weight.data.abs() * torch.sqrt(scaler[name].reshape(1, -1))
            mask = torch.zeros_like(metric) == 1
            if prune_n:
                for ii in range(metric.shape[1]):
                    if ii % prune_m == 0:
                        tmp = metric[:, ii:ii + prune_m].float()
                        mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
            else:
                indices = torch.sort(metric, dim=-1, stable=True)[1][:, :int(metric.shape[1] * sparsity)]
                mask.scatter_(1, indices, True)
            m.weight.data[mask] = 0
        hidden = [layer(h, ctx)[0] for h, ctx in zip(hidden, ctxs)]
    return model


@pytest.mark.parametrize("settings", [{"sparsity": 0.5}, {"pattern": "2:4"}])
@torch.no_grad()
def test_wanda_matches_the_reference(settings):
    """Whole-model Wanda equals the paper's code: statistics over every calibration token of the
    inputs the already-pruned layers give, per-row (or per-group) comparison, layer by layer."""
    import copy

    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                                    intermediate_size=64, max_seq_len=32)).eval()
    for p in model.parameters():  # features of very different sizes, as in trained models
        p.data.mul_(1 + 3 * torch.rand_like(p))
    tokens = torch.randint(0, 64, (6, 24))
    reference = _reference_wanda(copy.deepcopy(model), tokens, **(
        {"prune_n": 2, "prune_m": 4} if "pattern" in settings else settings))
    PRUNERS.get("wanda")(PruneConfig(method="wanda", **settings)).prune(model, tokens)
    got, want = dict(model.named_parameters()), dict(reference.named_parameters())
    for name in got:
        assert torch.equal(got[name] == 0, want[name] == 0), name
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    zero = sum(int((p == 0).sum()) for n, p in got.items() if "layers" in n and p.dim() == 2)
    assert zero == sum(p.numel() for n, p in got.items() if "layers" in n and p.dim() == 2) // 2


def test_target_modules_select_what_is_pruned():
    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model

    model = build_model(ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64))
    PRUNERS.get("magnitude")(PruneConfig(target_modules=["down_proj"], sparsity=0.5)).prune(model, None)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert ((module.weight == 0).float().mean() == 0.5) == name.endswith("down_proj"), name
    with pytest.raises(UsageError):
        PRUNERS.get("magnitude")(PruneConfig(target_modules=["nothing"])).prune(model, None)
    with pytest.raises(UsageError):
        PRUNERS.get("wanda")(PruneConfig(method="wanda", scope="global"))


def test_global_magnitude_uses_one_threshold():
    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(100)  # a loud module keeps more of its weights
    PRUNERS.get("magnitude")(PruneConfig(scope="global", sparsity=0.5)).prune(model, None)
    linears = [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    assert zeros == int(sum(m.weight.numel() for m in linears) * 0.5)
    loud, quiet = model.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.up_proj.weight
    assert (loud == 0).float().mean() < 0.1 and (quiet == 0).float().mean() > 0.4  # per module: not 50 %


# ------------------------------------------------------------------------------------------ the command


def test_wanda_2_4_end_to_end(llmctl, base, tmp_path):
    ckpt, text = base
    out = tmp_path / "w24"
    heldout = text.with_name("heldout.txt")
    r = llmctl("prune", ckpt, "--method", "wanda", "--pattern", "2:4", "--calibration", text, "--eval-data", heldout,
               *CAL, "-o", out, "--json")
    assert r.code == 0, r.stderr
    report = r.json()
    ppl = report["perplexity"]
    assert ppl["before"] > 1 and ppl["after"] > 1 and ppl["after"] != ppl["before"]
    assert report["sparsity"]["achieved"] == pytest.approx(0.5)
    from safetensors.torch import load_file

    tensors = load_file(out / "model.safetensors")
    pruned = [n for n in tensors if ".layers." in n and n.endswith("proj.weight")]
    assert len(pruned) == 14
    for name in pruned:  # every group of 4 inputs keeps exactly 2 weights
        assert ((tensors[name] != 0).view(tensors[name].shape[0], -1, 4).sum(-1) == 2).all(), name
    source = load_file(ckpt / "model.safetensors")
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):  # not pruned
        assert torch.equal(tensors[name], source[name])
    lineage = json.loads((out / "llmctl.json").read_text())
    assert lineage["command"] == "prune" and lineage["sparsity"]["pattern"] == "2:4"
    assert lineage["calibration"]["samples"] == 16 and lineage["parents"][0]["hash"]
    info = llmctl("info", out, "--json").json()
    assert info["sparsity"]["method"] == "wanda" and info["sparsity"]["achieved"] == pytest.approx(0.5)
    r = llmctl("eval", out, "--task", "perplexity", "--data", heldout, "--no-record", "--json")
    assert r.code == 0 and r.json()["results"][str(out)]["perplexity"]["perplexity"] == pytest.approx(ppl["after"])


def test_sparsegpt_end_to_end(llmctl, base, tmp_path):
    ckpt, text = base
    out = tmp_path / "sgpt"
    r = llmctl("prune", ckpt, "--method", "sparsegpt", "--sparsity", "0.5", "block_size=16", "--calibration", text,
               *CAL, "-o", out, "--json")
    assert r.code == 0, r.stderr
    assert r.json()["sparsity"]["achieved"] == pytest.approx(0.5)
    assert json.loads((out / "llmctl.json").read_text())["config"]["block_size"] == 16
    assert llmctl("generate", out, "the quick", "-n", "3").code == 0


def test_magnitude_needs_no_calibration_and_errors_are_clear(llmctl, base, tmp_path):
    ckpt, text = base
    r = llmctl("prune", ckpt, "--method", "magnitude", "--sparsity", "0.7", "-o", tmp_path / "m", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["sparsity"]["achieved"] == pytest.approx(0.7, abs=0.01)
    from llmctl.core.checkpoint import open_checkpoint
    from llmctl.core.model.io import load_model, save_model

    half = tmp_path / "bf16"
    save_model(load_model(ckpt, dtype=torch.bfloat16)[0], half, tokenizer_dir=ckpt)
    assert llmctl("prune", half, "--method", "magnitude", "-o", tmp_path / "bf16-50").code == 0
    assert {d for _, d in open_checkpoint(tmp_path / "bf16-50").tensor_shapes().values()} == {"bfloat16"}
    for args in (["--method", "wanda"],  # no calibration
                 ["--method", "magnitude", "--sparsity", "1.5"],
                 ["--method", "heads", "--pattern", "2:4", "--calibration", str(text)],
                 ["--method", "nope"]):
        r = llmctl("prune", ckpt, *args, "-o", tmp_path / "bad")
        assert r.code == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert not (tmp_path / "bad").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    r = llmctl("prune", ckpt, "--method", "magnitude", "-o", other, "--force")
    assert r.code != 0 and (other / "keep.txt").exists()
    r = llmctl("prune", ckpt, "--method", "magnitude", "--sparsity", "0.2", "-o", tmp_path / "m", "--force")
    assert r.code == 0, r.stderr  # --force replaces a pruned checkpoint


# ------------------------------------------------------------------------------------------ structured


def _logits_equal_transformers(ckpt: Path) -> None:
    import transformers

    from llmctl.core.model.io import load_model

    ids = torch.randint(3, 200, (2, 24))
    ours = load_model(ckpt)[0](ids).logits
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,extra,check", [
    ("heads", [], {"num_attention_heads": 2, "num_key_value_heads": 1}),
    ("heads", ["unit=queries"], {"num_attention_heads": 2, "num_key_value_heads": 2}),
    ("channels", ["--sparsity", "0.25"], {"intermediate_size": 48}),
    ("layers", [], {"num_hidden_layers": 1}),
])
def test_uniform_structured_pruning_is_a_smaller_hf_model(llmctl, base, tmp_path, method, extra, check):
    ckpt, text = base
    out = tmp_path / method
    r = llmctl("prune", ckpt, "--method", method, *extra, "--calibration", text, *CAL, "-o", out, "--json")
    assert r.code == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and {k: config[k] for k in check} == check
    assert r.json()["parameters"]["after"] < r.json()["parameters"]["before"]
    _logits_equal_transformers(out)


def test_heads_pruned_from_a_model_whose_hf_config_derives_head_dim_save_as_llmctl(llmctl, base, tmp_path):
    """GPT-NeoX has no head_dim key (hidden_size / heads): 3 heads of 16 in a width of 64 cannot be
    written as gpt_neox, so the checkpoint is llmctl's own type, which loads back with 3 heads of 16."""
    import shutil

    import transformers

    from llmctl.core.model.io import load_model

    _, text = base
    theirs = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, rotary_pct=0.5))
    theirs.save_pretrained(tmp_path / "neox")
    shutil.copy(base[0] / "tokenizer.json", tmp_path / "neox")
    r = llmctl("prune", tmp_path / "neox", "--method", "heads", "--sparsity", "0.25", "--calibration", text, *CAL,
               "-o", tmp_path / "out", "--json")
    assert r.code == 0, r.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llmctl"
    model = load_model(tmp_path / "out")[0]
    assert [layer.self_attn.num_heads for layer in model.model.layers] == [3, 3] and model.cfg.head_dim == 16


@pytest.mark.parametrize("method,settings,silent", [
    ("heads", {"sparsity": 0.5}, {"heads": [(0, 2), (0, 3), (1, 0), (1, 1)]}),  # a whole KV group per layer
    ("heads", {"sparsity": 0.5, "unit": "queries"}, {"heads": [(0, 0), (0, 3), (1, 1), (1, 2)]}),
    ("heads", {"sparsity": 0.25, "uniform": False}, {"heads": [(0, 0), (0, 1)]}),
    ("channels", {"sparsity": 0.25, "uniform": False}, {"channels": [(0, c) for c in range(0, 64, 2)]}),
    ("layers", {"sparsity": 0.5}, {"layers": [0]}),
])
def test_structured_pruning_removes_silent_units_exactly(base, method, settings, silent):
    """Units that contribute nothing are the ones removed, and the logits do not change (GQA
    groups, query heads within groups, per-layer sizes, layers); the KV cache of a model with
    per-layer sizes gives the same logits as a full forward."""
    from llmctl.core.hf import to_checkpoint
    from llmctl.core.model.io import load_model
    from llmctl.core.prune.calibration import calibration_tokens
    from llmctl.core.tokenizer import load_tokenizer

    ckpt, text = base
    model = load_model(ckpt, dtype=torch.float32)[0]
    silence(model, **silent)
    ids = torch.randint(3, 200, (2, 20))
    want, size = model(ids).logits, model.num_parameters()
    tokens = calibration_tokens([str(text)], load_tokenizer(ckpt), samples=8, seq_len=32)
    pruner = PRUNERS.get(method)(PruneConfig(method=method, **settings))
    small = pruner.prune(model, tokens)
    assert small.num_parameters() < size
    torch.testing.assert_close(small(ids).logits, want, rtol=1e-4, atol=1e-4)
    cache = small.make_cache(2, 20)
    small(ids[:, :15], cache=cache)
    torch.testing.assert_close(small(ids[:, 15:], cache=cache).logits, want[:, 15:], rtol=1e-4, atol=1e-4)
    uniform = settings.get("uniform", True)
    assert (to_checkpoint(small)[1]["model_type"] == "llama") == uniform


def test_per_layer_sizes_round_trip_through_the_cli(llmctl, base, tmp_path):
    ckpt, text = base
    out = tmp_path / "ch"
    r = llmctl("prune", ckpt, "--method", "channels", "--sparsity", "0.3", "uniform=false", "--calibration", text,
               *CAL, "-o", out, "--json")
    assert r.code == 0, r.stderr
    sizes = r.json()["sparsity"]["intermediate_sizes"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llmctl" and config["layer_intermediate_sizes"] == sizes and len(set(sizes)) == 2
    assert sum(sizes) == 128 - round(128 * 0.3)
    info = llmctl("info", out, "--json").json()
    assert info["intermediate_size"] == sizes and info["heads"] == 4
    assert info["sparsity"]["parameters_removed"] == pytest.approx(1 - info["parameters"]["total"] / r.json()["parameters"]["before"])
    g = llmctl("generate", out, "the quick", "-n", "4", "--json")
    assert g.code == 0 and len(g.json()["tokens"]) == 4, g.stderr


# ------------------------------------------------------------------------------------------ keep_sparsity


def test_keep_sparsity_keeps_the_zeros_while_training(llmctl, base, tmp_path):
    ckpt, text = base
    pruned = tmp_path / "pruned"
    assert llmctl("prune", ckpt, "--method", "magnitude", "-o", pruned).code == 0
    from safetensors.torch import load_file

    zeros = {n: t == 0 for n, t in load_file(pruned / "model.safetensors").items() if ".layers." in n}
    assert sum(int(z.sum()) for z in zeros.values()) > 0
    fast = [f"data={text}", f"model={pruned}", "max_steps=3", "batch_size=2", "seq_len=32", "warmup_steps=0",
            "eval_every=0", "save_every=0", "eval_batches=1", "peak_tflops=1", "tensorboard=false", "lr=1e-2"]
    for keep in (True, False):
        out = tmp_path / f"keep-{keep}"
        r = llmctl("train", *fast, f"keep_sparsity={str(keep).lower()}", "-o", out)
        assert r.code == 0, r.stderr
        trained = load_file(out / "model.safetensors")
        still = all(bool((trained[n][z] == 0).all()) for n, z in zeros.items())
        assert still == keep
        if keep:  # and the rest did train
            assert any(not torch.equal(trained[n][~z], load_file(pruned / "model.safetensors")[n][~z])
                       for n, z in zeros.items())


def test_recovery_recipe_finetunes_a_pruned_model(llmctl, base, tmp_path):
    """configs/finetune/prune-recovery: LoRA on a layer-pruned model; in full, keep_sparsity keeps the zeros."""
    ckpt, text = base
    records = tmp_path / "text.jsonl"
    records.write_text("".join(json.dumps({"text": t}) + "\n" for t in text.read_text().split("\n\n")))
    fast = ["--data", records, "max_steps=2", "batch_size=2", "seq_len=32", "warmup_steps=0", "eval_every=0",
            "save_every=0", "peak_tflops=1", "tensorboard=false"]
    layers = tmp_path / "layers"
    assert llmctl("prune", ckpt, "--method", "layers", "--sparsity", "0.5", "--calibration", text,
                  "--samples", "4", "--seq-len", "24", "-o", layers).code == 0
    recorded = json.loads((layers / "llmctl.json").read_text())["config"]
    assert (recorded["samples"], recorded["seq_len"]) == (4, 24)  # the flags, as quantize's
    r = llmctl("finetune", layers, "--config", "prune-recovery", *fast, "-o", tmp_path / "lora")
    assert r.code == 0, r.stderr
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    sparse = tmp_path / "sparse"
    assert llmctl("prune", ckpt, "--method", "magnitude", "-o", sparse).code == 0
    from safetensors.torch import load_file

    zeros = {n: t == 0 for n, t in load_file(sparse / "model.safetensors").items() if ".layers." in n}
    r = llmctl("finetune", sparse, "--config", "prune-recovery", *fast, "--method", "full", "keep_sparsity=true",
               "lr=1e-2", "-o", tmp_path / "full")
    assert r.code == 0, r.stderr
    trained = load_file(tmp_path / "full" / "model.safetensors")
    assert all(bool((trained[n][z] == 0).all()) for n, z in zeros.items())


def test_an_expert_without_calibration_tokens_is_pruned_by_magnitude():
    """SparseGPT on an expert no token reaches would zero it whole (an all-zero Hessian)."""
    from conftest import recording_reporter, unrouted_moe

    model, report = unrouted_moe(), recording_reporter()
    pruner = PRUNERS.get("sparsegpt")(PruneConfig(method="sparsegpt", sparsity=0.5, block_size=16))
    pruner.prune(model, torch.randint(0, 50, (4, 16)), report)
    for name in ("gate_proj", "up_proj", "down_proj"):
        weight = getattr(model.model.layers[0].mlp.experts[3], name).weight
        assert (weight == 0).float().mean() == 0.5
    assert len(report.seen) == 9 and all("saw no calibration tokens" in m for m in report.seen)
    assert "experts.0" not in " ".join(report.seen)
