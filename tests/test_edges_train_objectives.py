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

from llmctl.core.report import Silent
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
    rows = torch.randint(0, 320, (2, 33), generator=torch.Generator().manual_seed(1))
    inputs, labels, extra = trainer._inputs(rows, 0)
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


# -- SFT (`core/train/sft.py`) ----------------------------------------------------------------


def _sft_batches(rows: int = 10, val=None, **options):
    from llmctl.core.train.sft import SFTBatches

    train = torch.arange(rows)[:, None].repeat(1, 4)  # row i holds i
    return SFTBatches(train, val, **{"batch_size": 3, "rank": 0, "world": 1, "seed": 7, "eval_batches": 100,
                                     **options})


def test_sft_batches_visit_every_row_once_an_epoch_reshuffled_and_split_by_rank():
    """Batches of 3 over 10 rows cross epochs: each epoch is a permutation of the rows, seeded
    by (seed, epoch); batch i is the same whatever was asked before (resume); rank r of w gets
    the r-th slice of the batch a single process gets with w times the batch size."""
    one = _sft_batches()
    order = torch.cat([one.batch(i)[:, 0] for i in range(10)]).tolist()  # 30 positions: 3 epochs
    epochs = [order[e * 10:(e + 1) * 10] for e in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs) and len({tuple(e) for e in epochs}) == 3
    assert [_sft_batches().batch(i)[:, 0].tolist() for i in (8, 1, 5)] == [order[24:27], order[3:6], order[15:18]]
    assert _sft_batches(seed=8).batch(0)[:, 0].tolist() != order[:3]
    assert torch.equal(one.batch(2), torch.arange(10)[order[6:9]][:, None].repeat(1, 4))  # whole rows

    whole = _sft_batches(batch_size=6)
    for i in range(4):
        ranks = [_sft_batches(rank=r, world=2).batch(i) for r in range(2)]
        assert torch.equal(torch.cat(ranks), whole.batch(i))


def test_sft_validation_batches_per_rank():
    """Validation: the rows in batches of `batch_size`, at most `eval_batches`; rank r of w scores
    rows r, r + w, …, and every rank all of them when there are fewer rows than ranks."""
    val = torch.arange(7)[:, None]
    got = lambda **o: [b[:, 0].tolist() for b in _sft_batches(val=val, **o).val_batches()]  # noqa: E731
    assert got() == [[0, 1, 2], [3, 4, 5], [6]]
    assert got(eval_batches=2) == [[0, 1, 2], [3, 4, 5]]
    assert got(rank=1, world=2, batch_size=2) == [[1, 3], [5]]
    assert got(rank=1, world=7) == [[1]]
    assert got(rank=1, world=8) == [[0, 1, 2], [3, 4, 5], [6]]
    assert _sft_batches(val=None).val_batches() == [] and _sft_batches(val=val[:0]).val_batches() == []


def test_sft_batches_refuse_other_data_on_resume():
    from llmctl.errors import DataError

    batches = _sft_batches()
    assert batches.state() == {"rows": 10}
    batches.load_state({"rows": 10})
    for state, then in (({"rows": 9}, 9), ({}, None)):
        with pytest.raises(DataError, match=re.escape(f"the training data changed since the checkpoint ({then} rows "
                                                      "then, 10 now); resume with the same data")):
            batches.load_state(state)


def test_sft_hold_out_pad_and_summary():
    """`hold_out`: floor(n · val_fraction) items of a seeded shuffle (none of a single item), both
    parts in their order; `pad_id`: the tokenizer's pad, else its EOS, else 0; the data summary."""
    import random
    from types import SimpleNamespace

    from llmctl.core.data.sft import Stats
    from llmctl.core.train.sft import _describe, hold_out, pad_id

    cfg = SimpleNamespace(seed=3, val_fraction=0.25)
    items = list(range(10, 21))  # 11 items: 2 held
    shuffled = list(range(11))
    random.Random(3).shuffle(shuffled)
    train, val = hold_out(items, cfg)
    assert val == [items[i] for i in sorted(shuffled[:2])] and train == [x for x in items if x not in val]
    assert hold_out(items, SimpleNamespace(seed=4, val_fraction=0.25))[1] != val
    assert hold_out(items[:4], cfg)[1] != [] and hold_out(items[:3], cfg) == (items[:3], [])
    assert hold_out(["a"], SimpleNamespace(seed=3, val_fraction=1.0)) == (["a"], [])
    assert sorted(sum(hold_out(["a", "b"], SimpleNamespace(seed=3, val_fraction=0.5)), [])) == ["a", "b"]
    assert [len(part) for part in hold_out(["a", "b"], SimpleNamespace(seed=3, val_fraction=0.5))] == [1, 1]

    tok = lambda pad, eos: SimpleNamespace(pad_id=pad, eos_id=eos)  # noqa: E731
    assert (pad_id(tok(5, 2)), pad_id(tok(0, 2)), pad_id(tok(None, 2)), pad_id(tok(None, None))) == (5, 0, 2, 0)

    stats = Stats(examples=3, tokens=[4, 6, 9], loss_tokens=5, rows=2, fill=0.755)
    assert _describe(stats, None) == ("SFT data: 3 examples, 4/6.3/9 tokens per example (min/mean/max), 5 learned "
                                      "tokens in 2 rows (76% filled)")
    stats.truncated = 1
    assert _describe(stats, Stats(examples=2, rows=1)).endswith(
        "(76% filled); 1 cut to seq_len, 0 dropped (nothing left to learn); validation: 2 examples in 1 rows")
    stats.truncated, stats.dropped = 0, 4
    assert _describe(stats, None).endswith("filled); 0 cut to seq_len, 4 dropped (nothing left to learn)")


def test_sft_batch_learns_the_masked_tokens_and_separates_packed_documents():
    """Inputs are the ids but the last; a label is the next id where that token carries loss, else
    -100; `document_ids` (the row's document of each input) only when packing put several
    documents in a row of the batch."""
    from types import SimpleNamespace

    from llmctl.core.train.sft import SFT

    ids = torch.arange(10, 26).reshape(2, 8)
    mask = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0]])
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]])
    rows = torch.stack([ids, mask, docs], 1)
    batch = lambda rows, packing: SFT(SimpleNamespace(config=SimpleNamespace(packing=packing)),  # noqa: E731
                                      torch.device("cpu")).batch(rows, 0)
    inputs, labels, extra = batch(rows, True)
    assert torch.equal(inputs, ids[:, :-1]) and torch.equal(extra["document_ids"], docs[:, :-1])
    assert labels.tolist() == [[-100, 12, 13, -100, 15, 16, 17], [19, 20, 21, 22, 23, -100, -100]]
    assert batch(rows, False)[2] == {}
    one_each = rows.clone()
    one_each[:, 2] = 0
    assert batch(one_each, True)[2] == {}
    one_each[1, 2, -1] = 1  # a document starting at the last token: no input belongs to it
    assert batch(one_each, True)[2] == {}
    one_each[1, 2, -2:] = 1
    assert torch.equal(batch(one_each, True)[2]["document_ids"], one_each[:, 2, :-1])


class _Report(Silent):
    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(message)

    warn = info


@pytest.fixture(scope="module")
def sft_base(tmp_path_factory):
    """A tiny Llama checkpoint and 12 prompt/completion records."""
    from conftest import tiny_llama

    root = tmp_path_factory.mktemp("sft")
    (root / "base").mkdir()
    base = tiny_llama(root / "base", ["question: what is two plus three? answer: five. " * 20], vocab=200,
                      context=128, scale=2.0)
    records = root / "sums.jsonl"
    records.write_text("".join(json.dumps({"prompt": f"what is {a} plus {a}?", "completion": f" {a + a}."}) + "\n"
                               for a in range(12)))
    return base, records


def _finetune_plan(sft_base, *overrides, model=None, data=None, report=None):
    from llmctl.config import load_config
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.finetune_config import FinetuneConfig

    base, records = sft_base
    cfg = load_config(FinetuneConfig, "tiny", list(overrides), kind="finetune")
    cfg.model, cfg.data = str(model or base), [str(data or records)]
    cfg.objective = cfg.training_objective
    return make_plan(cfg, "cpu", report or _Report())


def test_sft_refusals_and_qlora_defaults(sft_base, corpus):  # noqa: F811
    def refused(message, *overrides, **where):
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            _finetune_plan(sft_base, *overrides, **where)

    refused(f"config key 'model': {corpus['bert']} is encoder-only; finetuning is for causal models", "method=full",
            f"tokenizer={sft_base[0]}", model=corpus["bert"])
    refused("config key 'merge_adapter': method prefix has no weights to merge into the base; its adapter directory "
            "loads as it is", "method=prefix", "merge_adapter=true")
    refused("method lora: adapters need a base checkpoint, not the preset nano", f"tokenizer={sft_base[0]}",
            model="nano")
    refused("config key 'data': SFT reads JSONL/JSON records, not token shards", "method=full", "seq_len=16",
            model="nano", data=corpus["shards"])
    assert _finetune_plan(sft_base, "merge_adapter=true").objective == "sft"  # LoRA merges

    lora, qlora = _finetune_plan(sft_base, "precision=auto"), _finetune_plan(sft_base, "method=qlora", "precision=auto")
    assert (lora.precision, lora.model_config.gradient_checkpointing) == ("float32", False)
    assert (qlora.precision, qlora.model_config.gradient_checkpointing) == ("bfloat16", True)  # PEFT's k-bit defaults
    chosen = _finetune_plan(sft_base, "method=qlora", "precision=float32", "gradient_checkpointing=false")
    assert (chosen.precision, chosen.model_config.gradient_checkpointing) == ("float32", False)


def test_sft_data_summary_and_batches_of_a_plan(sft_base):
    """The summary names the validation split; the batch source gets the validation rows and
    `eval_batches`."""
    from types import SimpleNamespace

    from llmctl.core.train.sft import SFT

    report = _Report()
    plan = _finetune_plan(sft_base, "val_fraction=0.5", "packing=false", "eval_batches=2", "batch_size=2",
                          report=report)
    assert report.lines == [report.lines[0]] and report.lines[0].endswith("; validation: 6 examples in 6 rows")
    batches = SFT(plan, torch.device("cpu")).data(SimpleNamespace(rank=0, world=1))
    assert [len(b) for b in batches.val_batches()] == [2, 2]
    assert torch.equal(torch.cat(batches.val_batches()), plan.prepared["val"][:4])


def _sft(**config):
    from types import SimpleNamespace

    from llmctl.core.train.sft import SFT

    objective = object.__new__(SFT)  # `prepare`, `loss` and `save` read only these
    objective.cfg = SimpleNamespace(**config)
    objective.plan = SimpleNamespace(init_from=config.get("base"))
    return objective


def test_sft_prepare_adds_the_adapter_once_and_trains_modules_to_save(sft_base):
    from llmctl.core.adapters import LoRA, lora_modules
    from llmctl.core.train.finetune_config import AdapterOptions
    from llmctl.core.model.io import load_model

    options = AdapterOptions(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    fresh, _ = load_model(sft_base[0])
    resumed, _ = load_model(sft_base[0], transforms=[LoRA(r=2, target_modules=["q_proj"])])  # as a resumed run's
    for model in (fresh, resumed):
        objective = _sft(adapter_method="lora", adapter=options)
        objective.prepare(model)
        assert [t.name for t in model.transforms] == ["lora"] and len(lora_modules(model)) == 2
        assert objective._model is model
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert "lm_head.weight" in trainable and all("lora_" in n for n in trainable - {"lm_head.weight"})


def test_sft_loss_takes_the_model_loss_where_the_chunked_one_would_be_wrong():
    """The chunked loss (frozen head: logits only at learned positions) leaves out a trained
    head's gradient and the multi-token heads' loss, so those take the model's loss; either way
    `loss` equals the model's (value and gradients), packed documents and MoE balance loss
    included; a batch with nothing to learn gives the model's NaN, as cross-entropy does."""
    from llmctl.core.adapters import LoRA, mark_trainable
    from llmctl.core.model import ModelConfig, Transformer

    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.where(torch.rand(2, 12, generator=torch.Generator().manual_seed(1)) < 0.5, ids, -100)
    extra = {"document_ids": torch.tensor([[0] * 5 + [1] * 7, [0] * 12])}
    for mtp, experts, adapter in ((0, 0, False), (1, 0, True), (0, 4, True)):
        model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_mtp_heads=mtp,
                                        num_experts=experts, experts_per_token=2, tie_embeddings=False))
        if adapter:
            LoRA(r=2, target_modules="all-linear").apply(model)
            mark_trainable(model)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(std=0.5)
        skipped = []

        def forward(*args, **kwargs):
            skipped.append(kwargs.get("skip_head", False))
            return model(*args, **kwargs)

        results = []
        objective = _sft(adapter_method="lora")
        objective._model = model
        for run in (lambda: objective.loss(forward, ids, labels, extra),
                    lambda: (lambda out: (out.loss + out.aux_loss, out.loss))(model(ids, labels=labels, **extra))):
            model.zero_grad()
            total, lm = run()
            total.backward()
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            results.append((float(total.detach()), float(lm.detach()), grads))
        (ours, ours_lm, ours_grads), (want, want_lm, want_grads) = results
        assert skipped == [mtp == 0 and adapter]
        assert ours == pytest.approx(want, rel=1e-5) and ours_lm == pytest.approx(want_lm, rel=1e-5)
        assert (want > want_lm) == bool(mtp or experts)
        assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(ours_grads, want_grads))
    with torch.no_grad():
        total, lm = objective.loss(forward, ids, torch.full_like(labels, -100), extra)
    assert lm.isnan() and total.isnan()


def test_sft_saves_a_checkpoint_for_full_finetuning_and_an_adapter_otherwise(sft_base, tmp_path):
    from llmctl.core.adapters import LoRA, mark_trainable
    from llmctl.core.checkpoint import open_checkpoint
    from llmctl.core.model.io import load_model

    base = sft_base[0]
    full, _ = load_model(base)
    _sft(adapter_method="full", base=base).save(full, tmp_path / "full", tokenizer_dir=base)
    again, _ = load_model(tmp_path / "full")
    assert all(torch.equal(p, again.state_dict()[n]) for n, p in full.state_dict().items())
    assert open_checkpoint(tmp_path / "full").has_tokenizer

    adapted, _ = load_model(base, transforms=[LoRA(r=2, target_modules=["q_proj"])])
    mark_trainable(adapted)
    _sft(adapter_method="lora", base=base).save(adapted, tmp_path / "lora", tokenizer_dir=base)
    written = {p.name for p in (tmp_path / "lora").iterdir()}
    assert {"adapter_config.json", "tokenizer.json"} <= written and "model.safetensors" not in written


def test_sft_chat_template_is_checked_against_the_vocabulary():
    from types import SimpleNamespace

    from llmctl.core.chat_templates import CHAT_TEMPLATES
    from llmctl.core.train.sft import chat_template

    def plan(name, vocabulary):
        return SimpleNamespace(config=SimpleNamespace(chat_template=name),
                               tokenizer=SimpleNamespace(inner=SimpleNamespace(token_to_id=vocabulary.get)))

    assert chat_template(plan(None, {})) is None and chat_template(plan("", {})) is None
    assert chat_template(plan("chatml", {"<|im_start|>": 5, "<|im_end|>": 6})) == CHAT_TEMPLATES.get("chatml").source
    with pytest.raises(ConfigError, match=re.escape("config key 'chat_template': the tokenizer lacks <|im_start|>, "
                                                    "<|im_end|>; give a template its vocabulary has") + "$"):
        chat_template(plan("chatml", {}))
    with pytest.raises(ConfigError, match="lacks <\\|im_end\\|>;"):
        chat_template(plan("chatml", {"<|im_start|>": 0}))  # an id of 0 is there


@pytest.fixture(scope="module")
def chatml_tok(sft_base, tmp_path_factory):
    """The tiny base's tokenizer with ChatML's two special tokens added."""
    from tokenizers import Tokenizer

    from llmctl.core.tokenizer import load_tokenizer

    base, path = sft_base[0], tmp_path_factory.mktemp("tok")
    inner = Tokenizer.from_file(str(base / "tokenizer.json"))
    inner.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    inner.save(str(path / "tokenizer.json"))
    shutil.copy(base / "tokenizer_config.json", path)
    return load_tokenizer(path)


def test_sft_encode_uses_the_template_the_validation_files_and_the_window(sft_base, chatml_tok, tmp_path):
    """`_encode`: rows of seq_len + 1 tokens (the shift), validation records from `val_data`
    (nothing held out of the training records then) packed as the training rows, and chats
    rendered with the `chat_template` key's template."""
    from types import SimpleNamespace

    from llmctl.core.train.finetune_config import FinetuneConfig
    from llmctl.core.train.sft import _encode

    base, records = sft_base
    tok = chatml_tok
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {a} plus {a}?"},
                                                      {"role": "assistant", "content": f"{a + a}."}]}) + "\n"
                             for a in range(5)))

    def encode(files, val_files=(), **keys):
        cfg = FinetuneConfig(model=str(base), **{"seq_len": 40, **keys})
        return _encode(SimpleNamespace(config=cfg, tokenizer=tok, text_files=[str(f) for f in files],
                                       val_files=[str(f) for f in val_files]))

    both = encode([records], [chats], packing=False, chat_template="chatml")
    assert both["stats"].examples == 12 and both["val_stats"].examples == 5 == len(both["val"])  # one per row
    assert both["train"].shape[-1] == both["val"].shape[-1] == 41
    start = tok.inner.token_to_id("<|im_start|>")
    assert (both["val"][:, 0] == start).sum(1).tolist() == [2] * 5  # a user and an assistant turn each
    assert (both["val"][:, 0, -1] == tok.pad_id).all() and (both["val"][:, 1, -1] == 0).all()
    packed = encode([records], [chats], chat_template="chatml", seq_len=120)
    assert len(packed["val"]) < 5 and packed["val_stats"].rows == len(packed["val"])
    with pytest.raises(Exception, match="chat template"):  # without the key: the tokenizer's, which it has not
        encode([chats])


# -- preference objectives (`core/train/preference.py`) ----------------------------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"what is {a} plus {a}?", "chosen": f" {a + a}.",
                                        "rejected": f" {a + a + 1}."}) + "\n" for a in range(8)))
    return path


def test_preference_refusals_name_the_setting(sft_base, pairs, tmp_path):
    def refused(message, *overrides, **where):
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            _finetune_plan(sft_base, *overrides, data=pairs, **where)

    for args, values in ((["objective_args.beta=0"], "0.0, 0.0"), (["objective_args.label_smoothing=0.5"], "0.1, 0.5"),
                         (["objective_args.label_smoothing=-0.1"], "0.1, -0.1")):
        refused(f"objective_args: beta must be > 0 and label_smoothing in [0, 0.5), got {values}", "method=dpo", *args)
    refused("method dpo: the reference model is the base; give a base checkpoint", "method=dpo", "adapter.method=full",
            f"tokenizer={sft_base[0]}", model="nano")
    assert _finetune_plan(sft_base, "method=dpo", "objective_args.label_smoothing=0.49", data=pairs).objective == "dpo"
    assert _finetune_plan(sft_base, "method=simpo", "adapter.method=full", f"tokenizer={sft_base[0]}", "seq_len=32",
                          model="nano", data=pairs).objective == "simpo"  # no reference: no base needed
    for method in ("prefix", "prompt"):
        refused(f"method reward with adapter={method}: use lora, dora, qlora or full", "method=reward",
                f"adapter.method={method}")
    tied = tmp_path / "tied"  # a base whose config has tied embeddings and no pad id (as many HF ones)
    shutil.copytree(sft_base[0], tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "pad_token_id": None, "tie_word_embeddings": True}))
    reward = _finetune_plan(sft_base, "method=reward", "adapter.method=lora", model=tied, data=pairs)
    assert (reward.model_config.num_labels, reward.model_config.tie_embeddings) == (1, False)
    assert reward.model_config.pad_token_id == reward.tokenizer.pad_id is not None


def _preference(cls, **config):
    from types import SimpleNamespace

    objective = object.__new__(cls)
    objective.cfg, objective.device = SimpleNamespace(**config), torch.device("cpu")
    return objective


def test_preference_batches_put_every_first_sequence_before_every_second():
    """Rows [B, 2, C, L] → 2B sequences cut after the last completion token of any: labels the
    next ids where learned, `kind` each sequence's mask value (KTO's label), and channel 2's
    first slot read back as the precomputed reference log-prob (a float64 stored in int64)."""
    from llmctl.core.data.preference import UNDESIRABLE

    ids = torch.arange(100, 132).reshape(2, 2, 8)
    mask = torch.zeros(2, 2, 8, dtype=torch.long)
    mask[0, 0, 2:4] = 1
    mask[0, 1, 2:6] = 1
    mask[1, 0, 3:5] = UNDESIRABLE
    mask[1, 1, 1:3] = 1
    reference = torch.tensor([[-1.5, -2.25], [-3.0, -0.5]], dtype=torch.float64)
    channel = torch.zeros(2, 2, 8, dtype=torch.long)
    channel[:, :, 0] = reference.view(torch.int64)
    rows = torch.stack([ids, mask, channel], 2)  # [2 records, 2 sequences, 3 channels, 8]

    from llmctl.core.train.preference import DPO, Reward, sequences

    seqs = sequences(rows)
    order = [(0, 0), (1, 0), (0, 1), (1, 1)]  # record, sequence
    assert seqs.shape == (4, 3, 6) and all(torch.equal(seqs[i], rows[r, s, :, :6]) for i, (r, s) in enumerate(order))
    inputs, labels, extra = _preference(DPO).batch(rows, 0)
    assert torch.equal(inputs, seqs[:, 0, :5])
    want = [[-100, 102, 103, -100, -100], [-100, -100, 119, 120, -100], [-100, 110, 111, 112, 113],
            [125, 126, -100, -100, -100]]
    assert labels.tolist() == want
    assert extra["kind"].tolist() == [1, UNDESIRABLE, 1, 1]
    assert extra["reference"].dtype == torch.float32 and extra["reference"].tolist() == [-1.5, -3.0, -2.25, -0.5]
    assert "reference" not in _preference(DPO).batch(rows[:, :, :2], 0)[2]
    chosen_rejected = _preference(Reward).batch(rows[:, :, :2], 0)
    assert torch.equal(chosen_rejected[0], seqs[:, 0]) and torch.equal(chosen_rejected[1], seqs[:, 1])
    assert chosen_rejected[2] == {}


def test_preference_metrics_and_the_chosen_nll_by_hand():
    """TRL's names and formulas: rewards' means, margin, accuracy (a tie is not a win); log-probs'
    means; the chosen completions' NLL per token (`Logps.means` of an empty sequence is 0)."""
    from llmctl.core.train.preference import Logps, chosen_nll, pair_metrics

    chosen, rejected = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, 2.0, 1.0])
    metrics = pair_metrics(chosen, rejected, torch.tensor([-3.0, -5.0]), torch.tensor([-7.0, -1.0]))
    assert {k: round(float(v), 6) for k, v in metrics.items()} == {
        "rewards/chosen": round(2 / 3, 6), "rewards/rejected": round(3.5 / 3, 6), "rewards/margins": -0.5,
        "rewards/accuracies": round(1 / 3, 6), "logps/chosen": -4.0, "logps/rejected": -4.0}
    logps = Logps(torch.tensor([-6.0, -3.0, -4.0, -2.0, -9.0, -1.0]), torch.tensor([3, 0, 2, 4, 4, 1]))
    assert logps.means().tolist() == [-2.0, -3.0, -2.0, -0.5, -2.25, -1.0]
    assert float(chosen_nll(logps)) == pytest.approx(13 / 5)  # the first three: (6 + 3 + 4) / (3 + 0 + 2)
    assert float(chosen_nll(Logps(torch.zeros(2), torch.zeros(2, dtype=torch.long)))) == 0.0
    assert float(chosen_nll(Logps(torch.tensor([-3.0, -1.0]), torch.tensor([1, 2])))) == 3.0  # one token


def test_reward_objective_scores_each_sequences_last_token_as_transformers(sft_base, pairs, tmp_path):
    """The reward objective's loss and metrics from the scores transformers'
    *ForSequenceClassification gives the saved model (each row's last non-pad token); the
    metrics are recorded in training only; with an adapter, the score head is one of the modules
    to save (once)."""
    import transformers
    from torch.nn import functional as F

    from llmctl.core.model.io import load_model
    from llmctl.core.train.distributed import Dist
    from llmctl.core.train.objectives import OBJECTIVES

    plan = _finetune_plan(sft_base, "method=reward", "adapter.method=full", "batch_size=4", data=pairs)
    objective = OBJECTIVES.get("reward")(plan, torch.device("cpu"))
    model = load_model(plan.init_from, dtype=torch.float32, config=plan.model_config)[0]
    objective.prepare(model)
    model.train()
    inputs, labels, extra = objective.batch(objective.data(Dist()).batch(0), 0)
    pad = plan.model_config.pad_token_id
    assert (inputs == pad).any(1).sum() >= 2  # rows of different lengths
    inputs[len(inputs) // 2] = inputs[0]  # the first pair tied: not a win for the accuracy
    loss, reported = objective.loss(model, inputs, labels, extra)
    objective.save(model, tmp_path / "rm")
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        chosen, rejected = reference(inputs, attention_mask=(inputs != pad).long()).logits[:, 0].chunk(2)
    scores = torch.cat([chosen, rejected])
    assert float(loss.detach()) == pytest.approx(float(-F.logsigmoid(chosen - rejected).mean()), rel=1e-5)
    assert float(reported) == float(loss.detach())
    want = {"accuracy": float((chosen > rejected).float().mean()), "margin": float((chosen - rejected).mean()),
            "mean_reward": float(scores.mean()), "min_reward": float(scores.min()), "max_reward": float(scores.max())}
    assert objective.recorded_metrics() == pytest.approx(want, rel=1e-5, abs=1e-6)
    model.eval()
    objective.loss(model, inputs, labels, extra)
    assert objective.recorded_metrics() == {}

    from llmctl.core.train.finetune_config import AdapterOptions

    def saved(modules):
        objective.cfg.adapter = AdapterOptions(modules_to_save=modules)
        return objective.adapter_options().modules_to_save

    assert (saved(None), saved(["lm_head"]), saved(["embed_tokens"])) == (
        ["lm_head"], ["lm_head"], ["embed_tokens", "lm_head"])


def test_orpo_and_kto_metrics_by_hand():
    """ORPO logs the chosen NLL and the mean log-odds ratio; KTO splits the examples by their
    label (the first half's `kind`: the second half holds their KL counterparts), logs the
    clamped KL estimate and each side's reward and log-prob means, and averages the losses."""
    from types import SimpleNamespace

    from llmctl.core.data.preference import DESIRABLE, UNDESIRABLE
    from llmctl.core.train import preference as P
    from llmctl.core.train import preference_losses as L

    def objective(cls, **args):
        obj = object.__new__(cls)
        obj.settings = P.settings(SimpleNamespace(config=SimpleNamespace(objective_args=args)))
        return obj

    policy = P.Logps(torch.tensor([-4.0, -6.0, -9.0, -8.0]), torch.tensor([2, 3, 3, 2]))
    reference = P.Logps(torch.tensor([-5.0, -6.5, -8.0, -9.5]), torch.tensor([2, 3, 3, 2]))
    loss, metrics = objective(P.ORPO, beta=0.3).criterion(policy, None, {})
    (pc, pr), nll = policy.means().chunk(2), torch.tensor(10 / 5)
    losses, _, _, ratio = L.orpo_loss(pc, pr, beta=0.3)
    assert float(metrics["nll_loss"]) == float(nll) and float(metrics["log_odds_ratio"]) == float(ratio.mean())
    assert torch.allclose(loss, nll + losses.mean())

    kind = torch.tensor([DESIRABLE, UNDESIRABLE, UNDESIRABLE, DESIRABLE])  # the KL half's kinds differ
    loss, metrics = objective(P.KTO, beta=0.5).criterion(policy, reference, {"kind": kind})
    kl = torch.tensor((-9.0 + 8.0 - 8.0 + 9.5) / 2)  # mean policy − reference over the KL half: 0.25
    assert float(metrics["kl"]) == float(kl)
    assert metrics["rewards/chosen"] == 0.5 and metrics["rewards/rejected"] == 0.25  # β (policy − reference)
    assert (float(metrics["logps/chosen"]), float(metrics["logps/rejected"])) == (-4.0, -6.0)
    want = L.kto_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([-5.0]), torch.tensor([-6.5]), kl,
                      beta=0.5)[0].mean()
    assert torch.allclose(loss, want)
    _, metrics = objective(P.KTO).criterion(policy, reference, {"kind": torch.full((4,), UNDESIRABLE)})
    assert "rewards/chosen" not in metrics and "logps/chosen" not in metrics and "rewards/rejected" in metrics


def test_preference_loss_reads_the_precomputed_reference_and_adds_the_aux_loss(sft_base, pairs, tmp_path):
    """Through `loss`: the precomputed reference log-probs (from the batch) give the loss the
    online reference gives, the model's auxiliary loss is added, and metrics are recorded in
    training only."""
    from llmctl.core.model.io import load_model
    from llmctl.core.train.distributed import Dist
    from llmctl.core.train.objectives import OBJECTIVES

    data = tmp_path / "pairs.jsonl"
    shutil.copy(pairs, data)
    losses = []
    for precompute in ("true", "false"):
        plan = _finetune_plan(sft_base, "method=dpo", "batch_size=4", f"objective_args.precompute_ref={precompute}",
                              "val_fraction=0.25", data=data)
        objective = OBJECTIVES.get("dpo")(plan, torch.device("cpu"))
        model = load_model(plan.init_from, dtype=torch.float32, config=plan.model_config)[0]
        objective.prepare(model)
        batches = objective.data(Dist())
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5)
        model.train()
        batch = objective.batch(batches.batch(0), 0)
        assert ("reference" in batch[2]) == (precompute == "true")
        assert [v.shape[2] for v in batches.val_batches()] == [3 if precompute == "true" else 2]  # 2 pairs
        losses.append(objective.loss(model, *batch)[0].detach())
    assert float(losses[0]) == pytest.approx(float(losses[1]), abs=1e-5) and float(losses[0]) != pytest.approx(0.6931)
    assert set(objective.recorded_metrics()) >= {"rewards/chosen", "rewards/margins", "logps/rejected"}

    def with_aux(*args, **kwargs):
        out = model(*args, **kwargs)
        out.aux_loss = torch.tensor(0.25)
        return out

    model.eval()
    assert float(objective.loss(with_aux, *batch)[0].detach()) == pytest.approx(float(losses[1]) + 0.25, abs=1e-5)
    assert float(objective.val_loss(model, *batch).detach()) == pytest.approx(float(losses[1]), abs=1e-5)
    assert objective.recorded_metrics() == {}


@pytest.mark.parametrize("method, adapter, precompute", [("dpo", "full", "false"), ("dpo", "full", "true"),
                                                       ("ipo", "lora", "true"), ("ipo", "full", "true")])
def test_the_reference_stays_the_base_while_the_policy_moves(sft_base, pairs, tmp_path, method, adapter, precompute):
    """Each reference source (a frozen copy, precomputed log-probs; an adapter switched off is
    the default of the other tests) gives the base model's log-probs after the policy moved:
    the loss is DPO's / IPO's formula (TRL's) by hand on log-probs gathered from the policy's and
    a fresh base's logits (IPO on per-token means, so the precomputed counts matter)."""
    import torch.nn.functional as F

    from llmctl.core.model.io import load_model
    from llmctl.core.train.distributed import Dist
    from llmctl.core.train.objectives import OBJECTIVES

    data = tmp_path / "pairs.jsonl"
    shutil.copy(pairs, data)
    plan = _finetune_plan(sft_base, f"method={method}", f"adapter.method={adapter}", "batch_size=4",
                          f"objective_args.precompute_ref={precompute}", "objective_args.beta=0.5", data=data)
    objective = OBJECTIVES.get(method)(plan, torch.device("cpu"))
    model = load_model(plan.init_from, dtype=torch.float32, config=plan.model_config)[0]
    objective.prepare(model)
    batch = objective.batch(objective.data(Dist()).batch(0), 0)
    inputs, labels, _ = batch
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if adapter == "full" or "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05) if adapter == "full" else p.normal_(std=0.5)
    model.eval()
    base = load_model(plan.init_from, dtype=torch.float32, config=plan.model_config)[0].eval()

    def values(m):
        with torch.no_grad():
            logp = F.log_softmax(m(inputs).logits.float(), -1)
        keep = labels != -100
        tokens = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * keep
        sums = tokens.sum(1)
        return (sums / keep.sum(1) if method == "ipo" else sums).chunk(2)

    (pc, pr), (rc, rr) = values(model), values(base)
    assert not torch.allclose(pc, rc, atol=1e-3)  # the policy moved
    logits = (pc - pr) - (rc - rr)
    expected = (logits - 1 / (2 * 0.5)) ** 2 if method == "ipo" else -F.logsigmoid(0.5 * logits)
    assert float(objective.loss(model, *batch)[0].detach()) == pytest.approx(float(expected.mean()), abs=1e-5)


def test_the_reference_copy_is_float32_with_the_runs_context(sft_base, pairs, tmp_path):
    """Full finetuning's frozen reference: the base loaded in float32 (as the policy), whatever
    its stored dtype, with the run's context settings (a longer context, RoPE scaling)."""
    from llmctl.core.model.io import load_model, save_model
    from llmctl.core.train.objectives import OBJECTIVES

    base = sft_base[0]
    save_model(load_model(base)[0].to(torch.bfloat16), tmp_path / "bf16", tokenizer_dir=base)
    plan = _finetune_plan(sft_base, "method=dpo", "adapter.method=full", "max_seq_len=256",
                          "rope_scaling={type: linear, factor: 2.0}", model=tmp_path / "bf16", data=pairs)
    reference = OBJECTIVES.get("dpo")(plan, torch.device("cpu")).reference_model
    assert {p.dtype for p in reference.parameters()} == {torch.float32}
    assert reference.cfg == plan.model_config and reference.cfg.max_seq_len == 256


def test_preference_encode_reports_the_split_and_renders_chats(sft_base, chatml_tok, pairs, tmp_path):
    """`encode`: rows of seq_len + 1 tokens; validation pairs from `val_data`, else held out
    (none: no validation rows, and the summary says nothing of them); conversational pairs
    rendered with the `chat_template` key's template; the summary line."""
    from types import SimpleNamespace

    from llmctl.core.train.finetune_config import FinetuneConfig
    from llmctl.core.train.objectives import OBJECTIVES
    from llmctl.core.train.preference import DPO

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"what is {a} plus {a}?"}],
                                         "chosen": [{"role": "assistant", "content": f"{a + a}."}],
                                         "rejected": [{"role": "assistant", "content": f"{a}."}]}) + "\n"
                             for a in range(3)))

    def encode(files, val_files=(), **keys):
        report = _Report()
        cfg = FinetuneConfig(model=str(sft_base[0]), **{"seq_len": 48, **keys})
        prepared = DPO.encode(SimpleNamespace(config=cfg, tokenizer=chatml_tok, text_files=[str(f) for f in files],
                                              val_files=[str(f) for f in val_files], objective="dpo", report=report))
        return prepared, report.lines

    prepared, lines = encode([pairs], [chats], chat_template="chatml")
    longest = prepared["stats"].longest
    assert lines == [f"dpo data: 8 pairs, longest sequence {longest} tokens; validation: 3"]
    assert prepared["train"].shape == (8, 2, 2, 49) and prepared["val"].shape == (3, 2, 2, 49)
    start = chatml_tok.inner.token_to_id("<|im_start|>")
    assert ((prepared["val"][:, :, 0] == start).sum(-1) == 2).all()  # a user and an assistant turn
    prepared, lines = encode([pairs])  # 5% of 8 pairs: none held out
    assert prepared["val"] is None and lines == [f"dpo data: 8 pairs, longest sequence {longest} tokens"]
    assert len(encode([pairs], val_fraction=0.25)[0]["val"]) == 2

    plan = _finetune_plan(sft_base, "method=dpo", "val_fraction=0.5", "batch_size=1", "eval_batches=3", data=pairs)
    assert len(OBJECTIVES.get("dpo")(plan, torch.device("cpu")).data(SimpleNamespace(rank=0, world=1))
               .val_batches()) == 3  # of 4
