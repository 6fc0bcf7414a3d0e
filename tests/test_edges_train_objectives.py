"""Edges of the training objectives (`core/train/objectives.py`) that the training tests left
open, found by mutation testing: each refusal's message, the masked-LM batch (its width, the
special tokens it never picks, `mask_prob`, batches that depend on (seed, index) only), the
auxiliary losses' sign, and validation under `document_mask`."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from torch.nn import functional as F

from llmctl.errors import ConfigError
from test_blindspots_train import _trainer
from test_train import FAST, corpus  # noqa: F401  (fixture)


def _plan(corpus, *overrides, data=None):  # noqa: F811
    from llmctl.config import load_config
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.config import TrainConfig

    cfg = load_config(TrainConfig, None, [f"data={data or corpus['shards']}", "model=nano", *FAST, *overrides],
                      kind="train")
    return make_plan(cfg, "cpu")


@pytest.fixture(scope="module")
def bare_shards(corpus, tmp_path_factory):  # noqa: F811
    """The test shards without their tokenizer and without an EOS id (as shards of other tools)."""
    path = tmp_path_factory.mktemp("bare") / "shards"
    shutil.copytree(corpus["shards"], path)
    manifest = json.loads((path / "manifest.json").read_text())
    shutil.rmtree(path / manifest.pop("tokenizer"))
    manifest.pop("eos_id", None)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_refusals_name_the_key_and_the_reason(corpus, bare_shards):  # noqa: F811
    def refused(message, *overrides, data=None):
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            _plan(corpus, *overrides, data=data)

    refused("config key 'objective_args': objective causal takes none", "objective_args.beta=0.1")
    refused(f"config key 'objective': model {corpus['bert']} is encoder-only; use objective=masked",
            f"model={corpus['bert']}", "objective=causal")
    refused("config key 'objective': model nano has no multi-token heads (num_mtp_heads)", "objective=mtp")
    refused("config key 'document_mask': the data has no EOS token between documents", "document_mask=true",
            data=bare_shards)
    refused("config key 'tokenizer': masked-LM training needs a tokenizer with a [MASK] token",
            f"model={corpus['bert']}", data=bare_shards)
    assert _plan(corpus, "document_mask=true").objective == "causal"  # the same keys where they apply


def test_masked_batch_is_bert_corruption_of_the_window(corpus, tmp_path):  # noqa: F811
    """A masked batch covers the window's first seq_len tokens (the shards' rows carry one more
    for the causal shift), picks `mask_prob` of them and never a special token, and batch i is
    a function of (seed, i) alone: the global random state does not reach it (exact resume)."""
    from llmctl.core.train.data import mask_tokens

    trainer = _trainer(corpus, tmp_path, f"model={corpus['bert']}", "mask_prob=0.4")
    objective, plan = trainer.objective, trainer.plan
    tok = plan.tokenizer
    assert tok.eos_id is not None and plan.special_ids == [i for i in (tok.bos_id, tok.eos_id, tok.pad_id)
                                                           if i is not None]
    rows = torch.randint(0, 320, (256, 33), generator=torch.Generator().manual_seed(0))
    rows[:, ::3] = tok.eos_id  # a third of the positions are special
    inputs, labels, extra = objective.batch(rows, 5)
    assert inputs.shape == labels.shape == (256, 32) and extra == {}
    picked = labels != -100
    assert torch.equal(labels[picked], rows[:, :-1][picked])
    special = rows[:, :-1] == tok.eos_id
    assert not picked[special].any()  # the special tokens are never picked, the others at mask_prob
    assert picked[~special].float().mean() == pytest.approx(0.4, abs=0.03)

    torch.manual_seed(123)
    again = objective.batch(rows, 5)
    torch.manual_seed(456)
    assert all(torch.equal(a, b) for a, b in zip(again[:2], objective.batch(rows, 5)[:2]))
    assert not torch.equal(labels, objective.batch(rows, 6)[1])  # another index, another draw
    given = objective.batch(rows, 5, torch.Generator().manual_seed(7))  # a generator handed in is used
    expected = mask_tokens(rows[:, :-1], mask_id=plan.mask_id, vocab_size=plan.model_config.vocab_size, prob=0.4,
                           generator=torch.Generator().manual_seed(7), special_ids=plan.special_ids)
    assert all(torch.equal(a, b) for a, b in zip(given[:2], expected))


def test_the_auxiliary_losses_are_added_to_the_minimised_loss(corpus, tmp_path):  # noqa: F811
    """MoE balance and multi-token losses are minimised with the LM loss (added, not subtracted)."""
    trainer = _trainer(corpus, tmp_path, f"model={corpus['moe']}")
    inputs, labels, extra = trainer._inputs(torch.randint(0, 320, (2, 33), generator=torch.Generator().manual_seed(1)), 0)
    with torch.no_grad():
        total, lm = trainer.objective.loss(trainer.forward, inputs, labels, extra)
        out = trainer.model(inputs, labels=labels)
    assert float(out.aux_loss) > 0
    assert float(lm) == pytest.approx(float(out.loss), rel=1e-6)
    assert float(total) == pytest.approx(float(out.loss + out.aux_loss), rel=1e-6)


def test_validation_scores_each_document_alone(corpus, tmp_path):  # noqa: F811
    """With `document_mask=true` the validation loss, too, scores each document on its own."""
    trainer = _trainer(corpus, tmp_path, "document_mask=true")
    eos = trainer.plan.model_config.eos_token_id
    rows = torch.randint(0, 300, (1, 33), generator=torch.Generator().manual_seed(2))
    rows[0, [9, 20]] = eos  # documents of 10, 11 and 11 tokens
    inputs, labels, extra = trainer._inputs(rows, 0)
    model = trainer.model.eval()
    with torch.no_grad():
        loss = float(trainer.objective.val_loss(trainer.forward, inputs, labels, extra))
        total = sum(float(F.cross_entropy(model(inputs[:, a:b]).logits[0], labels[0, a:b], reduction="sum"))
                    for a, b in ((0, 10), (10, 21), (21, 32)))
    assert loss == pytest.approx(total / labels.numel(), rel=1e-5)


def test_adamw_is_fused_on_cpu_and_cuda_only_and_gets_its_settings():
    """The fused AdamW kernel where torch has one for llmctl's devices (CPU here), not elsewhere
    (a model still on the meta device); the settings reach every group."""
    from llmctl.core.model import ModelConfig, Transformer
    from llmctl.core.train.optim import build_optimizer

    def build(model):
        return build_optimizer(model, lr=3e-4, weight_decay=0.1, no_decay=["norm", "embed"], betas=(0.8, 0.9),
                               eps=1e-7)

    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2)
    optimizer = build(Transformer(config))
    assert optimizer.defaults["fused"] is True
    assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (3e-4, (0.8, 0.9), 1e-7, 0.1), (3e-4, (0.8, 0.9), 1e-7, 0.0)]
    with torch.device("meta"):
        assert build(Transformer(config)).defaults["fused"] is False
