"""The public layer-by-layer run equals `forward`, and hooks see every Linear's input."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from llmctl.core.model import ModelConfig  # noqa: E402
from llmctl.core.model.build import build_model  # noqa: E402
from llmctl.core.model.layerwise import LayerwiseRun, capture_inputs  # noqa: E402

VARIANTS = {
    "llama-gqa": dict(num_kv_heads=2, tie_embeddings=False, qk_norm=True),
    "gpt2-like": dict(position="learned", norm="layernorm", mlp="gelu", qkv_bias=True, o_bias=True, mlp_bias=True),
    "bert-like": dict(is_causal=False, position="learned", norm="layernorm", norm_placement="post",
                      embedding_norm=True, type_vocab_size=2, mlp="gelu", lm_head_bias=True),
    "alibi-window": dict(position="alibi", sliding_window=5),
    "moe": dict(num_experts=4, experts_per_token=2, shared_expert_intermediate_size=32),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_layer_by_layer_equals_forward(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
                                    initializer_range=0.2, **VARIANTS[name])).eval()
    ids = torch.randint(0, 97, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    for kwargs in ({}, {"attention_mask": mask}):
        with torch.no_grad():
            expected = model(ids, **kwargs).logits
            run = LayerwiseRun(model, ids, **kwargs)
            for _ in run.blocks:
                run.step()
            torch.testing.assert_close(run.logits(), expected, rtol=0, atol=0)


def test_hooks_capture_linear_inputs_and_a_block_can_rerun():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4)).eval()
    ids = torch.randint(0, 97, (2, 7))
    seen = {}
    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(ids)
        run = LayerwiseRun(model, ids)
        run.step()
        block_input = run.hidden
        with capture_inputs(run.blocks[run.index]) as inputs:
            out = run.step()
        assert set(inputs) == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
        assert torch.equal(inputs["mlp.down_proj"][0], seen["x"])
        # change the block (zero its output projection) and run it again from its saved input
        nn.init.zeros_(run.blocks[1].mlp.down_proj.weight)
        run.index = 1
        changed = run.step(block_input)
        assert torch.equal(changed, run.blocks[1](block_input, run.ctx)[0]) and not torch.equal(changed, out)
        partial = LayerwiseRun(model, ids)
        partial.step()
        with pytest.raises(RuntimeError, match=r"^1 block\(s\) have not run yet$"):
            partial.logits()
    block = model.model.layers[1]  # the hooks are gone: only the test's own remains
    assert len(block.mlp.down_proj._forward_pre_hooks) == 1 and not block.self_attn.q_proj._forward_pre_hooks
