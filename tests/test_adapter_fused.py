"""LoRA's one-node dense layer (`lora._LoraLinear`): PEFT's forward and adapter gradients, the
unfused path's, with and without dropout, in float32, under bf16 autocast and compiled."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
import peft  # noqa: E402

from conftest import tiny_llama  # noqa: E402

from llmctl.core.adapters import LoRA, lora, lora_modules, mark_trainable, save_adapter  # noqa: E402
from llmctl.core.model.io import load_model  # noqa: E402

IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 150, 11], [9, 8, 7, 6, 5, 4, 3, 2]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("base"), ["a stitch in time saves nine. " * 20], vocab=200,
                      context=64, scale=2.0)


def _adapted(base, method: str, dropout: float):
    model, _ = load_model(base, transforms=[LoRA(r=4, alpha=8, dropout=dropout, target_modules="all-linear",
                                                 dora=method == "dora")])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in lora_modules(model).values():
            for p in (module.lora_A.weight, module.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    mark_trainable(model)
    return model.train()


def _step(model, names, autocast: bool = False):
    """(logits, {adapter tensor name: gradient}) of one forward and backward of a fixed loss, the
    dropout masks drawn from seed 0."""
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(IDS)
    logits = (out.logits if hasattr(out, "logits") else out[0]).float()
    (logits * torch.linspace(-1, 1, logits.numel()).view(logits.shape)).sum().backward()
    grads = {name: p.grad.clone() for name, p in names(model)}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def _ours(model):
    return [(f"{path}.{part}.weight", getattr(m, part).weight) for path, m in lora_modules(model).items()
            for part in ("lora_A", "lora_B")]


def _theirs(model):
    return [(n.removeprefix("base_model.model.").replace(".default", ""), p) for n, p in model.named_parameters()
            if ".lora_A." in n or ".lora_B." in n]


def _unfused(monkeypatch):
    monkeypatch.setattr(lora, "fusable", lambda module, x: False)


def _close(ours: dict, reference: dict, tol: float) -> None:
    """Every tensor within tol, relative to the reference's largest magnitude when above 1."""
    assert ours.keys() == reference.keys()
    for key, ref in reference.items():
        assert (ours[key] - ref).abs().max() <= tol * max(1.0, ref.abs().max()), key


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_and_adapter_gradients_equal_peft_and_the_unfused_path(base, tmp_path, monkeypatch, method,
                                                                       dropout):
    model = _adapted(base, method, dropout)
    assert all(lora.fusable(m, IDS.float()) == (method == "lora") for m in lora_modules(model).values())
    logits, grads = _step(model, _ours)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, save_adapter(model, tmp_path / "a", base=base), is_trainable=True)
    peft_logits, peft_grads = _step(theirs.train(), _theirs)
    _close({"logits": logits}, {"logits": peft_logits}, 1e-5)
    _close(grads, peft_grads, 1e-5)
    assert any(g.abs().max() > 0 for g in grads.values())
    _unfused(monkeypatch)
    unfused_logits, unfused_grads = _step(model, _ours)
    _close({"logits": logits}, {"logits": unfused_logits}, 1e-5)
    _close(grads, unfused_grads, 1e-5)


def _error(grads: dict, reference: dict) -> float:
    """Relative L2 distance of all adapter gradients together."""
    return (sum(((grads[k] - reference[k]) ** 2).sum() for k in reference)
            / sum((g ** 2).sum() for g in reference.values())).sqrt().item()


def test_bf16_autocast_is_as_accurate_as_the_unfused_path_and_saves_no_more(base, monkeypatch):
    """Under autocast the fused layer casts its input once for the base and the adapter (the
    unfused path casts it twice), computes the same logits, adapter gradients as close to
    float32's, and keeps no more for backward."""
    model = _adapted(base, "lora", 0.0)
    _, exact = _step(model, _ours)
    logits, grads = _step(model, _ours, autocast=True)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 8, layer.in_features, requires_grad=True) * 1  # not a leaf: autocast caches no cast of it

    def saved_bytes():
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
            layer(x)
        return sum(seen.values())

    fused = saved_bytes()
    _unfused(monkeypatch)
    assert 0 < fused <= saved_bytes()
    unfused_logits, unfused_grads = _step(model, _ours, autocast=True)
    _close({"logits": logits}, {"logits": unfused_logits}, 1e-3)
    assert 0 < _error(grads, exact) <= 1.25 * _error(unfused_grads, exact)


def test_compiled_fused_layer_equals_eager(base):
    """torch.compile traces through the fused layer (one layer: compiling a model takes minutes)."""
    layer = _adapted(base, "lora", 0.0).model.layers[0].mlp.up_proj
    x = torch.randn(2, 8, layer.in_features)
    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True)):
        xg = x.clone().requires_grad_()
        y = fn(xg)
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        results.append({"y": y.detach(), "x": xg.grad, "A": layer.lora_A.weight.grad, "B": layer.lora_B.weight.grad})
        layer.zero_grad(set_to_none=True)
    _close(results[1], results[0], 1e-5)


@pytest.mark.parametrize("dropout, autocast", [(0.0, False), (0.3, False), (0.0, True)])
def test_one_node_layer_keeps_the_base_bias(monkeypatch, dropout, autocast):
    """A LoRA layer over a linear with a bias (GPT-2's, Qwen2's q/k/v): the one-node path (taken:
    its backward is `_LoraLinear`'s) equals the composed one in output and every gradient —
    the input's, A's and B's."""
    from torch import nn

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 16, bias=True))
    LoRA(r=4, alpha=8, dropout=dropout, target_modules=["0"]).apply(base)
    layer = base[0]
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.bias.normal_()
    mark_trainable(base)
    x0 = torch.randn(3, 5, 24)
    fusable = lora.fusable

    def run(fused: bool):
        monkeypatch.setattr(lora, "fusable", lambda m, x: fused and fusable(m, x))
        torch.manual_seed(1)
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = base(x)
        assert ("_LoraLinear" in type(y.grad_fn).__name__) == fused
        (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        grads = [x.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()]
        base.zero_grad(set_to_none=True)
        return y.detach().float(), grads

    (y1, g1), (y0, g0) = run(True), run(False)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y1, y0, **tol)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_fresh_adapters_start_as_peft_does():
    """A Kaiming-uniform with a = √5 (bound 1/√fan_in), B zero: the adapter starts as no change."""
    from torch import nn

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 64))
    LoRA(r=32, alpha=8, target_modules=["0"]).apply(base)
    a, b = base[0].lora_A.weight, base[0].lora_B.weight
    bound = 1 / 256 ** 0.5
    assert 0.98 * bound < float(a.detach().abs().max()) <= bound
    assert not b.any()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_on_a_biased_linear_equals_peft(dropout):
    """DoRA over a linear with a bias (the base output without its bias is what the magnitude
    rescales): output and adapter gradients equal PEFT's, dropout in training included."""
    import copy

    from torch import nn

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(24, 16, bias=True))
    with torch.no_grad():
        plain[0].bias.normal_()
    theirs = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                                        target_modules=["0"], use_dora=True))
    LoRA(r=4, alpha=8, dropout=dropout, target_modules=["0"], dora=True).apply(plain)
    ours = plain
    layer, their = ours[0], theirs.base_model.model[0]
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        their.lora_B["default"].weight.copy_(layer.lora_B.weight)
        their.lora_A["default"].weight.copy_(layer.lora_A.weight)
        their.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    mark_trainable(ours)
    ours.train(), theirs.train()
    x = torch.randn(3, 5, 24)
    outs = []
    for model, a, b in ((ours, layer.lora_A.weight, layer.lora_B.weight),
                        (theirs, their.lora_A["default"].weight, their.lora_B["default"].weight)):
        torch.manual_seed(1)
        y = model(x)
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        outs.append((y.detach(), a.grad.clone(), b.grad.clone()))
    for mine, reference in zip(*outs):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)
