"""16-bit attention on CPU (`attention._explicit_blocks`): explicit products a block of queries
at a time, against float32 attention and transformers' eager bfloat16 attention."""

import pytest
import torch
import torch.nn.functional as F

from llmctl.core.model import attention


def _inputs(heads, kv_heads, tq, k, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(2, heads, tq, 32, dtype=dtype, requires_grad=True)
    kv = [torch.randn(2, kv_heads, k, 32, dtype=dtype, requires_grad=True) for _ in range(2)]
    return q, kv


def _reference(q, kv, mask):
    """float32 SDPA on the same (rounded) inputs; mask bool [.., T, K] or additive."""
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, *kv))
    out = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, enable_gqa=q.shape[1] != kv[0].shape[1])
    return out, (q32, k32, v32)


@pytest.mark.parametrize("heads,kv_heads,tq,k", [(4, 4, 40, 40), (6, 2, 40, 40), (6, 2, 23, 70), (2, 1, 1, 9)])
def test_causal_blocks_equal_float32_attention(heads, kv_heads, tq, k):
    """Bottom-right causal, several query blocks (block 16), GQA groups: values and gradients
    within bfloat16 rounding of float32 attention."""
    q, kv = _inputs(heads, kv_heads, tq, k)
    out = attention._explicit_blocks(q, *kv, None, True, 0.0, block=16)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    ref, leaves = _reference(q, kv, torch.ones(tq, k, dtype=torch.bool).tril(k - tq))
    assert (out.float() - ref).abs().max() < 2e-2
    grad = torch.randn_like(ref)
    mine = torch.autograd.grad(out, [q, *kv], grad.bfloat16())
    theirs = torch.autograd.grad(ref, leaves, grad)
    for a, b in zip(mine, theirs):
        assert (a.float() - b).abs().max() < 3e-2 * b.abs().max()


def test_bool_and_additive_masks():
    """A document mask (bool) and an ALiBi-like bias (additive, kept in float32) as SDPA applies them."""
    q, kv = _inputs(6, 2, 40, 40)
    documents = torch.tensor([0] * 15 + [1] * 25)
    allowed = (documents[:, None] == documents[None, :]) & torch.ones(40, 40, dtype=torch.bool).tril()
    out = attention._explicit_blocks(q, *kv, allowed[None, None], False, 0.0, block=16)
    ref, _ = _reference(q, kv, allowed)
    assert (out.float() - ref).abs().max() < 2e-2
    distance = torch.arange(40)[:, None] - torch.arange(40)[None, :]
    bias = (-0.5 * distance.abs().float()).masked_fill(~allowed, float("-inf"))[None, None].expand(2, 6, 40, 40)
    out = attention._explicit_blocks(q, *kv, bias, False, 0.0, block=16)
    ref, _ = _reference(q, kv, bias)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 2e-2


def test_dropout_drops_probabilities():
    q, kv = _inputs(4, 4, 20, 20)
    torch.manual_seed(1)
    dropped = attention._explicit_blocks(q, *kv, None, True, 0.5)
    kept = attention._explicit_blocks(q, *kv, None, True, 0.0)
    assert (dropped - kept).abs().max() > 0.1


@pytest.mark.parametrize("dtype,tq,k,taken", [
    (torch.bfloat16, 64, 64, True), (torch.float16, 64, 64, True), (torch.bfloat16, 8, 300, True),
    (torch.bfloat16, 1, 64, False),  # one query (decoding): SDPA, as the compiled step
    (torch.bfloat16, 64, attention.EXPLICIT_16BIT_UP_TO + 1, False),  # the probabilities would not fit
    (torch.float32, 64, 64, False),
])
def test_sdpa_kernel_takes_the_explicit_path_for_16bit_cpu(monkeypatch, dtype, tq, k, taken):
    q, kv = _inputs(4, 2, tq, k, dtype)
    calls = []
    real = attention._explicit_blocks
    monkeypatch.setattr(attention, "_explicit_blocks", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    mask = None if tq == k else torch.ones(tq, k, dtype=torch.bool).tril(k - tq)
    with torch.no_grad():
        out = attention.sdpa_attention(q, *kv, mask, tq == k, 0.0)
    assert bool(calls) == taken
    ref, _ = _reference(q, kv, torch.ones(tq, k, dtype=torch.bool).tril(k - tq))
    assert (out.float() - ref).abs().max() < 2e-2


def test_bfloat16_llama_equals_transformers_eager_attention(tmp_path):
    """A bfloat16 Llama (2 query blocks) through llmctl's default kernel gives transformers'
    eager-attention logits (the same products, a float32 softmax rounded to bfloat16), padded too."""
    import transformers

    from llmctl.core.model.io import load_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                           attn_implementation="eager").eval()
    ours, _ = load_model(tmp_path, dtype=torch.bfloat16)
    ours.eval()
    ids = torch.randint(0, 64, (2, 150))
    padding = torch.ones(2, 150, dtype=torch.long)
    padding[1, :20] = 0
    for mask in (None, padding):
        with torch.no_grad():
            a = ours(ids, attention_mask=mask).logits.float()
            b = theirs(ids, attention_mask=mask).logits.float()
        real = slice(None) if mask is None else (mask.bool())
        assert (a - b)[real].abs().max() < 0.03


def test_autocast_takes_the_explicit_path_in_its_dtype(monkeypatch):
    """Under bfloat16 autocast q and k arrive float32 (the rotation upcasts them): the kernel
    still runs in bfloat16, and a bfloat16-autocast model's output stays close to float32's."""
    from llmctl.core.model.config import ModelConfig
    from llmctl.core.model.transformer import Transformer

    dtypes = []
    real = attention._explicit_blocks
    monkeypatch.setattr(attention, "_explicit_blocks",
                        lambda q, k, v, *a, **kw: dtypes.append((q.dtype, k.dtype, v.dtype)) or real(q, k, v, *a, **kw))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=128, max_seq_len=64))
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
        assert not dtypes
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(ids).logits.float()
    assert dtypes == [(torch.bfloat16,) * 3] * 2
    assert (half - full).abs().max() < 0.05


@pytest.mark.parametrize("case", ["llama-gqa-untied", "mistral-window", "qwen2-window", "gemma-mqa", "gpt2-tied",
                                  "bert"])
def test_bfloat16_architectures_equal_transformers_eager(case, tmp_path):
    """Every mask kind through the 16-bit path (causal, sliding windows, GQA/MQA, learned
    positions, bidirectional, left padding): bfloat16 logits as transformers' eager bfloat16
    attention gives them, within bfloat16 rounding of the whole model."""
    from test_hf_parity import CASES, build_hf

    from llmctl.core.model.io import load_model

    build_hf(*CASES[case]).save_pretrained(tmp_path)
    family = CASES[case][0]
    cls = type(build_hf(*CASES[case]))
    theirs = cls.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager").eval()
    ours, _ = load_model(tmp_path, dtype=torch.bfloat16)
    ours.eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (2, 40))
    padding = torch.ones(2, 40, dtype=torch.long)
    padding[1, :7] = 0
    for mask in (None, padding):
        positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)  # (GPT-2 does not derive them)
        with torch.no_grad():
            a = ours(ids, attention_mask=mask, position_ids=positions).logits.float()
            b = theirs(ids, attention_mask=mask, position_ids=positions).logits.float()
        real = slice(None) if mask is None else mask.bool()
        assert (a - b)[real].abs().max() < 0.05 * b[real].abs().max(), (family, mask is not None)
