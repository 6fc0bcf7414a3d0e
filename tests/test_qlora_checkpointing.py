"""QLoRA with gradient checkpointing: blocks recompute in backward, the NF4 base is never saved dense,
gradients equal the plain path's; the qlora method turns checkpointing on by default."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402,F401

from conftest import tiny_llama  # noqa: E402

from llmctl.core.adapters import LoRA, mark_trainable  # noqa: E402
from llmctl.core.model.config import ModelConfig  # noqa: E402
from llmctl.core.model.transformer import Transformer  # noqa: E402
from llmctl.core.quant.nf4 import NF4, NF4Linear  # noqa: E402

CONFIG = dict(vocab_size=97, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=128,
              max_seq_len=64, residual_dropout=0.0)


def qlora_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CONFIG))
    NF4().apply(model)
    LoRA(r=4, alpha=8, dropout=0.1, target_modules="all-linear").apply(model)  # dropout: the RNG must replay
    mark_trainable(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model.train()


def saved_bytes(model, ids) -> tuple[int, list[tuple]]:
    """(bytes of the distinct tensors autograd keeps for backward, their shapes) of one forward."""
    seen: dict[int, torch.Tensor] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return sum(t.untyped_storage().nbytes() for t in seen.values()), [tuple(t.shape) for t in seen.values()]


def test_checkpointed_nf4_blocks_give_the_plain_gradients_and_keep_no_dense_weight():
    model = qlora_model()
    ids = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(1))
    grads, kept = [], []
    for flag in (False, True):
        model.cfg.gradient_checkpointing = flag
        model.zero_grad()
        torch.manual_seed(2)  # the same dropout masks in both runs (checkpointing replays them in the recompute)
        kept.append(saved_bytes(model, ids))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and len(plain) == 3 * 7 * 2
    assert all(plain[n].abs().sum() > 0 for n in plain)
    assert max((plain[n] - checkpointed[n]).abs().max().item() for n in plain) <= 1e-6
    dense = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, NF4Linear)}
    (plain_bytes, plain_shapes), (checkpointed_bytes, _) = kept
    assert not dense & set(plain_shapes)  # NF4's matmul keeps the packed weight, never a dequantized copy
    assert checkpointed_bytes < plain_bytes / 3  # only each block's input (and the head's) outlive the forward


def test_qlora_checkpoints_by_default_and_the_recipe_says_so(tmp_path):
    from llmctl.config import load_config
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.finetune_config import FinetuneConfig

    base = tmp_path / "base"
    base.mkdir()
    tiny_llama(base, ["one two three four five six seven. " * 20], vocab=120, context=64)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "one two three four five"}) + "\n" for _ in range(8)))

    def checkpointing(source, *overrides):
        cfg = load_config(FinetuneConfig, source, ["seq_len=16", *overrides], kind="finetune")
        cfg.model, cfg.data = str(base), [str(data)]
        return make_plan(cfg, "cpu").model_config.gradient_checkpointing

    assert checkpointing(None, "method=qlora") is True  # PEFT's prepare_model_for_kbit_training default
    assert checkpointing(None, "method=qlora", "gradient_checkpointing=false") is False
    assert checkpointing(None, "method=lora") is False
    assert checkpointing("qlora") is True and checkpointing("lora") is False
