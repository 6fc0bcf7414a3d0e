"""Decorated functions the earlier mutation rounds never mutated (docs/testing.md, round 10): the
pruners' `prune` methods against the papers' definitions worked out on tiny tensors, LoRA's
one-node autograd function against torch's autograd of the unfused computation, `merge_adapter`
against PEFT's `merge_and_unload`, NF4's autograd function and its release of the file pages."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))

from llmctl.core.adapters import lora as lora_module  # noqa: E402


# ----------------------------------------------------------------------------------- LoRA's autograd node


def _unfused(x, weight, bias, a, b, scaling, mask):
    """x Wᵀ + bias + s · (x' Aᵀ) Bᵀ, x' = x · mask (the dropout's draw) or x, by plain autograd."""
    x_lora = x if mask is None else x * mask
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x_lora, a), b)


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_lora_node_gives_autograds_output_and_every_gradient(dropout, with_bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=gen)  # [batch, tokens, in]: the node flattens and restores the shape
    weight, a, b = torch.randn(4, 5, generator=gen), torch.randn(2, 5, generator=gen), torch.randn(4, 2, generator=gen)
    bias = torch.randn(4, generator=gen) if with_bias else None
    mask = (torch.rand(2, 3, 5, generator=gen) > 0.4).float() / 0.6 if dropout else None
    grad_out = torch.randn(2, 3, 4, generator=gen)

    def leaves():
        return [t.clone().requires_grad_(True) for t in (x, a, b)]

    x1, a1, b1 = leaves()
    dropped = None if mask is None else x1 * mask  # the dropout's output, taken back to x by autograd
    out = lora_module._LoraLinear.apply(x1, weight, bias, a1, b1, 2.5, dropped)
    out.backward(grad_out)
    x2, a2, b2 = leaves()
    want = _unfused(x2, weight, bias, a2, b2, 2.5, mask)
    want.backward(grad_out)
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for ours, theirs in ((x1, x2), (a1, a2), (b1, b2)):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trained", ["x", "a", "b"])
def test_the_lora_node_gives_the_gradients_asked_for_and_only_those(trained):
    """One of the input, A and B needs a gradient (a frozen adapter, or half of one): it gets
    autograd's, the others none."""
    gen = torch.Generator().manual_seed(1)
    tensors = {"x": torch.randn(3, 5, generator=gen), "a": torch.randn(2, 5, generator=gen),
               "b": torch.randn(4, 2, generator=gen)}
    weight = torch.randn(4, 5, generator=gen)
    ours = {k: v.clone().requires_grad_(k == trained) for k, v in tensors.items()}
    theirs = {k: v.clone().requires_grad_(k == trained) for k, v in tensors.items()}
    lora_module._LoraLinear.apply(ours["x"], weight, None, ours["a"], ours["b"], 0.5, None).sum().backward()
    _unfused(theirs["x"], weight, None, theirs["a"], theirs["b"], 0.5, None).sum().backward()
    torch.testing.assert_close(ours[trained].grad, theirs[trained].grad)
    assert all(ours[k].grad is None for k in tensors if k != trained)


def test_a_prompt_learning_model_is_refused_by_merge_adapter():
    from llmctl.core.adapters import merge_adapter
    from llmctl.core.adapters.prompt import Prompt
    from llmctl.errors import UsageError

    model = Prompt(num_virtual_tokens=2).apply(_model())
    with pytest.raises(UsageError) as e:
        merge_adapter(model)
    assert str(e.value) == ("prefix and prompt adapters have no weights to merge into the base; use the adapter "
                            "directory itself")


@pytest.mark.parametrize("dora", [False, True])
def test_merge_adapter_is_peft_merge_and_unload_and_keeps_the_models_dtype(base, tmp_path, dora):
    """Float32: PEFT's merged weights; the same model in bfloat16 merges into bfloat16 layers with
    them rounded; the merged layers are frozen like the base; other transforms stay recorded."""
    import peft
    import transformers
    from llmctl.core.adapters import LoRA, lora_modules, merge_adapter, save_adapter
    from llmctl.core.model.io import load_model

    model, _ = load_model(base, transforms=[LoRA(r=2, alpha=6, target_modules=["q_proj", "down_proj"], dora=dora)])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            for w in (m.lora_A.weight, m.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
    adapter = save_adapter(model, tmp_path / "adapter", base=base)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    want = peft.PeftModel.from_pretrained(hf, adapter).merge_and_unload().state_dict()
    half, _ = load_model(adapter, dtype=torch.bfloat16)
    merged = merge_adapter(model).state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(merged[name], want[name], rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "q_proj" in n or "down_proj" in n)
    merge_adapter(half)
    q = half.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and q.weight.dtype == torch.bfloat16
    torch.testing.assert_close(q.weight.float(), want["model.layers.0.self_attn.q_proj.weight"], rtol=1e-2, atol=1e-2)


def test_merge_adapter_keeps_the_bias_and_the_other_transforms():
    """A biased linear merges into W + s·BA with its bias; an NF4 base under LoRA stays NF4 (and
    recorded); a model that records no transforms merges too."""
    from llmctl.core.adapters import LoRA, lora_modules, merge_adapter
    from llmctl.core.quant.nf4 import NF4, NF4Linear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    LoRA(r=2, alpha=4, target_modules=["0"]).replace("0", model[0])  # no `transforms` recorded on the model
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    want = layer.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    bias = layer.bias.detach().clone()
    merge_adapter(model)
    assert type(model[0]) is nn.Linear and model.transforms == []
    torch.testing.assert_close(model[0].weight, want.detach())
    assert torch.equal(model[0].bias, bias)
    quantized = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 3))
    nf4, lora = NF4(target_modules=["0"]), LoRA(r=2, target_modules=["0"])
    nf4.apply(quantized)
    lora.apply(quantized)
    assert lora_modules(quantized)
    merge_adapter(quantized)
    assert type(quantized[0]) is NF4Linear and quantized.transforms == [nf4]


def test_a_lora_config_names_the_file_it_came_from_in_its_errors():
    from llmctl.core.adapters import LoRA
    from llmctl.errors import CheckpointError

    with pytest.raises(CheckpointError) as e:
        LoRA.from_peft_config({"peft_type": "LORA", "bias": "all"}, nn.Linear(2, 2), "somewhere/adapter_config.json")
    assert str(e.value) == "somewhere/adapter_config.json: bias='all' is not supported"


# --------------------------------------------------------------------------------- the pruners' prune


def _pruner(**settings):
    from llmctl.core.prune import PRUNERS, PruneConfig

    return PRUNERS.get(settings.get("method", "magnitude"))(PruneConfig(**settings))


def _model(seed: int = 0, **overrides):
    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model

    torch.manual_seed(seed)
    cfg = dict(vocab_size=50, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=24)
    model = build_model(ModelConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():  # weights of unequal scale, so no two units are near a tie
        for p in model.parameters():
            p.mul_(1 + torch.rand(p.shape))
    return model


def _inputs_of(model, tokens, name: str) -> list[torch.Tensor]:
    """Per block, the [tokens, features] input of its module `name` in a plain forward."""
    seen, hooks = [], []
    for block in model.model.layers:
        module = block.get_submodule(name)
        hooks.append(module.register_forward_pre_hook(
            lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return seen


def _head_energy(model, tokens) -> list[torch.Tensor]:
    """Σ_t ‖W_o,h x_t,h‖² per query head: its contribution to the attention output, squared."""
    d = model.cfg.head_dim
    energies = []
    for block, x in zip(model.model.layers, _inputs_of(model, tokens, "self_attn.o_proj")):
        w = block.self_attn.o_proj.weight
        heads = x.shape[1] // d
        energies.append(torch.stack([(x[:, h * d:(h + 1) * d] @ w[:, h * d:(h + 1) * d].t()).square().sum()
                                     for h in range(heads)]))
    return energies


def _rows_kept(before: torch.Tensor, after: torch.Tensor, size: int) -> list[int]:
    """Which blocks of `size` rows of `before` make up `after`, in order."""
    blocks = before.view(-1, size, before.shape[1])
    return [next(i for i in range(len(blocks)) if torch.equal(blocks[i], part))
            for part in after.view(-1, size, after.shape[1])]


@pytest.mark.parametrize("layers", [None, ([8, 2, 4], [4, 1, 1])])
def test_query_heads_kept_are_the_strongest_of_each_group(layers):
    """Four groups of two (the kept heads' offsets are their group's), and per-layer counts."""
    overrides = {} if layers is None else {"layer_num_heads": layers[0], "layer_num_kv_heads": layers[1]}
    model = _model(num_heads=8, num_kv_heads=4, **overrides)
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    energy = _head_energy(model, tokens)
    q = [b.self_attn.q_proj.weight.clone() for b in model.model.layers]
    pruner = _pruner(method="heads", unit="queries", sparsity=0.5)
    pruned = pruner.prune(model, tokens)
    d = model.cfg.head_dim
    for i, (e, block) in enumerate(zip(energy, pruned.model.layers)):
        groups = e.view(model.cfg.layer(i).num_kv_heads, -1)
        per_group = groups.shape[1]
        n = per_group - min(round(per_group * 0.5), per_group - 1)
        want = [g * per_group + j for g in range(len(groups)) for j in sorted(groups[g].topk(n).indices.tolist())]
        assert _rows_kept(q[i], block.self_attn.q_proj.weight, d) == want, i
    assert pruner.summary["kv_heads"] == [model.cfg.layer(i).num_kv_heads for i in range(3)]


@pytest.mark.parametrize("layers", [None, ([4, 2, 4], [2, 1, 2])])
def test_kv_groups_kept_are_the_strongest_by_their_heads_energy(layers):
    overrides = {} if layers is None else {"layer_num_heads": layers[0], "layer_num_kv_heads": layers[1]}
    model = _model(seed=2, **overrides)
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(3))
    energy = _head_energy(model, tokens)
    k = [b.self_attn.k_proj.weight.clone() for b in model.model.layers]
    q = [b.self_attn.q_proj.weight.clone() for b in model.model.layers]
    pruner = _pruner(method="heads", unit="groups", sparsity=0.5)
    pruned = pruner.prune(model, tokens)
    d, heads, kv_heads = model.cfg.head_dim, [], []
    for i, (e, block) in enumerate(zip(energy, pruned.model.layers)):
        cfg = model.cfg.layer(i)
        per_group = cfg.num_heads // cfg.num_kv_heads
        group = e.view(cfg.num_kv_heads, -1).sum(1)
        n = cfg.num_kv_heads - min(round(cfg.num_kv_heads * 0.5), cfg.num_kv_heads - 1)
        want = sorted(group.topk(n).indices.tolist())
        assert _rows_kept(k[i], block.self_attn.k_proj.weight, d) == want, i
        assert _rows_kept(q[i], block.self_attn.q_proj.weight, d) == [g * per_group + j for g in want
                                                                      for j in range(per_group)], i
        heads.append(n * per_group)
        kv_heads.append(n)
    assert pruner.summary == {"heads": heads, "kv_heads": kv_heads}


def test_channels_kept_are_those_of_the_largest_contribution_energy():
    """Σ_t x_t,c² · ‖W_down[:, c]‖², by hand from the down projection's inputs."""
    model = _model(seed=4)
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(5))
    xs = _inputs_of(model, tokens, "mlp.down_proj")
    down = [b.mlp.down_proj.weight.clone() for b in model.model.layers]
    pruner = _pruner(method="channels", sparsity=0.25)
    pruned = pruner.prune(model, tokens)
    for i, (x, w, block) in enumerate(zip(xs, down, pruned.model.layers)):
        energy = x.square().sum(0) * w.square().sum(0)
        want = sorted(energy.topk(24 - 6).indices.tolist())
        kept = [next(c for c in range(24) if torch.equal(w[:, c], col)) for col in block.mlp.down_proj.weight.t()]
        assert kept == want, i
    assert pruner.summary == {"intermediate_sizes": [18, 18, 18]}


def test_layers_removed_are_those_of_least_block_influence():
    """ShortGPT: BI_i = 1 − mean over tokens of cos(block i's input, its output), by hand; the
    summary has them to 6 decimals and the removed layers."""
    model = _model(seed=6, num_layers=4)
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(7))
    ins, outs, hooks = [], [], []
    for block in model.model.layers:
        hooks.append(block.register_forward_pre_hook(lambda m, args: ins.append(args[0])))
        hooks.append(block.register_forward_hook(lambda m, args, out: outs.append(out[0])))
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    influence = [1 - F.cosine_similarity(a.reshape(-1, 32), b.reshape(-1, 32), dim=1).mean().item()
                 for a, b in zip(ins, outs)]
    pruner = _pruner(method="layers", sparsity=0.5)
    pruner.prune(model, tokens)
    got = pruner.summary["block_influence"]
    assert got == pytest.approx(influence, abs=2e-6)
    assert all(round(v, 6) == v for v in got)
    assert pruner.summary["removed_layers"] == sorted(torch.tensor(influence).argsort()[:2].tolist())


def test_the_pruners_report_their_progress():
    from _recorder import Recorder

    model, tokens = _model(), torch.randint(0, 50, (2, 8))
    for settings, want in [({"method": "heads"}, ("score heads", 3, "layer")),
                           ({"method": "channels"}, ("score channels", 3, "layer")),
                           ({"method": "layers", "sparsity": 0.3}, ("score layers", 3, "layer")),
                           ({"method": "wanda", "target_modules": ["q_proj"]}, ("prune", 3, "layer")),
                           ({"method": "magnitude", "target_modules": ["q_proj", "lm_head"]}, ("prune", 4, "module"))]:
        report = Recorder()
        _pruner(**settings).prune(_model(), tokens, report)
        assert report.steps() == [("progress", *want)] + [("advance", 1)] * want[1], settings


def test_wanda_prunes_only_the_modules_asked_for_and_refuses_the_head():
    model = _model()
    tokens = torch.randint(0, 50, (2, 8))
    dense = {n: p.clone() for n, p in model.named_parameters()}
    _pruner(method="wanda", target_modules=["v_proj"], sparsity=0.5).prune(model, tokens)
    for name, p in model.named_parameters():
        assert (p == 0).float().mean() == (0.5 if name.endswith("v_proj.weight") else 0), name
        if not name.endswith("v_proj.weight"):
            assert torch.equal(p, dense[name]), name
    from llmctl.errors import UsageError

    with pytest.raises(UsageError) as e:
        _pruner(method="sparsegpt", target_modules=["lm_head", "q_proj"]).prune(model, tokens)
    assert str(e.value) == "sparsegpt prunes the blocks' modules only, not lm_head"


# ------------------------------------------------------------------------------------------------- NF4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from conftest import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("base"), ["a stitch in time saves nine. " * 10], vocab=60, context=16)


def test_nf4_leaves_no_tensor_on_the_checkpoints_memory_map(base):
    """A checkpoint's tensors load memory-mapped (storages torch cannot resize); after NF4 every
    tensor left — the head, the norms, the new codes — has its own memory, with the same values."""
    from llmctl.core.model.io import load_model
    from llmctl.core.quant.nf4 import NF4

    plain, _ = load_model(base)
    assert not plain.lm_head.weight.untyped_storage().resizable()  # what the release is for
    model, _ = load_model(base, transforms=[NF4()])
    state, dense = model.state_dict(), plain.state_dict()
    assert all(t.untyped_storage().resizable() for t in state.values())
    for name in ("lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"):
        assert torch.equal(state[name], dense[name]), name


def test_nf4_matmul_gradient_in_half_precision_is_the_dequantized_weights():
    """x Wᵀ and grad W for a bfloat16 input: the weight dequantized in the gradient's dtype."""
    from llmctl.core.quant.nf4 import NF4Linear

    gen = torch.Generator().manual_seed(3)
    q = NF4Linear(nn.Linear(64, 16, bias=False))
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16).requires_grad_(True)
    g = torch.randn(3, 16, generator=gen).to(torch.bfloat16)
    y = q(x)
    y.backward(g)
    w = q.dequantize(torch.bfloat16)
    assert y.dtype == x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y, x.detach() @ w.t())
    torch.testing.assert_close(x.grad, g @ w)
