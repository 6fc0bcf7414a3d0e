"""The training step's edges, in process (mutation testing of `core/train/loop.py`'s `train_step`,
`_weights`, `_inputs`, `evaluate` and `make_data`): what each rank reads, EOS between raw-text
documents, the micro-batch weights, when DDP synchronises, the WSD schedule's decay, the
masked objective's seeded masks, and a float32 step that asks for no autocast."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from test_blindspots_train import _trainer
from test_edges_train_loop import _windows
from test_train import corpus  # noqa: F401  (fixture)


# -- what each rank reads ------------------------------------------------------------------------


def test_two_ranks_micro_batches_together_are_one_process_batch_of_twice_the_size(corpus, tmp_path):
    """Sequential sampling: rank r of 2 takes rows r·b … of the global batch of 2·b windows, for
    training and validation alike; random sampling reads other rows than sequential."""
    from llmctl.core.train.distributed import Dist
    from llmctl.core.train.loop import make_data

    pair = _trainer(corpus, tmp_path, "sampling=sequential", "batch_size=2", "eval_batches=2").plan
    whole = make_data(_trainer(corpus, tmp_path, "sampling=sequential", "batch_size=4", "eval_batches=2").plan, Dist())
    ranks = [make_data(pair, Dist(rank=r, world=2)) for r in (0, 1)]
    for step in range(2):
        assert torch.equal(torch.cat([rank.batch(step) for rank in ranks]), whole.batch(step))
    vals = [rank.val_batches() for rank in ranks]
    assert len(vals[0]) == 2 and all(torch.equal(torch.cat([vals[0][b], vals[1][b]]), want)
                                     for b, want in enumerate(whole.val_batches()))
    randomly = make_data(_trainer(corpus, tmp_path, "sampling=random", "batch_size=4").plan, Dist())
    assert not torch.equal(randomly.batch(0), whole.batch(0))


def test_shards_whose_manifest_has_no_validation_split_give_no_validation(corpus, tmp_path):
    """A manifest with a train split only (ours always lists `val`, empty or not)."""
    import json
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(corpus["shards"], shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["splits"]["val"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    trainer = _trainer(corpus, tmp_path, f"data={shards}")
    assert trainer.val == [] and trainer.evaluate() is None


def test_raw_text_documents_end_with_eos_in_training_and_validation(corpus, tmp_path):
    """Each pass over a text file ends with EOS before the next pass, in training and in the
    validation batches (drawn until their pass is over)."""
    from llmctl.core.tokenizer import load_tokenizer

    tok = load_tokenizer(corpus["tok"])
    text = "Whether 'tis nobler in the mind to suffer"
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("To be, or not to be, that is the question.", encoding="utf-8")
    val.write_text(text, encoding="utf-8")
    trainer = _trainer(corpus, tmp_path, f"data={train}", f"tokenizer={corpus['tok']}", f"val_data={val}",
                       "seq_len=4", "batch_size=2", "eval_batches=8")
    one_pass = tok.encode(train.read_text(encoding="utf-8")) + [tok.eos_id]
    rows = torch.cat([trainer.data.batch(i) for i in range(8)])
    assert torch.equal(rows, _windows(one_pass * (1 + 64 // len(one_pass)), 16, seq=4))
    assert (rows == tok.eos_id).any()
    val_ids = tok.encode(text) + [tok.eos_id]
    got = torch.cat(trainer.val)
    assert 2 <= len(got) < 16  # batches until the pass over the text is done
    assert torch.equal(got, _windows(val_ids * 4, len(got), seq=4)) and (got == tok.eos_id).any()


# -- the micro-batch weights ---------------------------------------------------------------------


def _weights(targets, world: int = 1, monkeypatch=None):
    """Trainer._weights for micro-batches holding `targets` (None: the objective counts none)."""
    from llmctl.core.train import distributed
    from llmctl.core.train.loop import Trainer

    if world > 1:  # every rank holds the same counts
        monkeypatch.setattr(distributed, "all_reduce_sum_", lambda t, d: t.mul_(d.world))
    objective = SimpleNamespace(targets=lambda n: None if n is None else torch.tensor(n))
    this = SimpleNamespace(objective=objective, device=torch.device("cpu"), d=distributed.Dist(rank=0, world=world))
    return [float(w) for w in Trainer._weights(this, list(targets))]


def test_micro_batch_weights(monkeypatch):
    """A mean over targets: each micro-batch's share of the step's targets on all ranks, times the
    ranks; none counted: 1/grad_accum each; a step with one target (or none) divides by one."""
    assert _weights([None, None]) == [0.5, 0.5] and _weights([None] * 3) == pytest.approx([1 / 3] * 3)
    assert _weights([3, 1]) == [0.75, 0.25]
    assert _weights([1]) == [1.0] and _weights([0, 0]) == [0.0, 0.0]
    assert _weights([3, 1], world=2, monkeypatch=monkeypatch) == [0.75, 0.25]  # 2 · 3 / (2 · 4)


def test_gradients_synchronise_on_the_last_micro_batch_only(corpus, tmp_path, monkeypatch):
    from llmctl.core.train import distributed

    trainer = _trainer(corpus, tmp_path, "grad_accum=3")
    calls = []
    monkeypatch.setattr(distributed, "set_grad_sync", lambda model, sync: calls.append((model, sync)))
    trainer.train_step()
    assert [sync for _, sync in calls] == [False, False, True] and all(m is trainer.wrapped for m, _ in calls)


# -- the schedule, the masked objective, autocast -------------------------------------------------


def test_wsd_decays_over_the_last_decay_fraction_of_the_steps(corpus, tmp_path):
    """MiniCPM's WSD with 4 steps, no warm-up and decay_fraction 0.5: lr, lr, then a linear
    decay from lr toward min_lr over the last 2 steps."""
    trainer = _trainer(corpus, tmp_path, "schedule=wsd", "decay_fraction=0.5", "max_steps=4", "warmup_steps=0",
                       "lr=0.01", "min_lr=0.002")
    lrs = [trainer.train_step()[3] for _ in range(4)]
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.006])


def test_masked_objective_masks_by_step_and_validation_by_one_generator(corpus, tmp_path):
    """Training micro-batch i is masked with a generator seeded seed·1,000,003 + i (by the step
    too); the fixed validation batches with one generator seeded seed + 1, drawn in order."""
    from llmctl.core.train.data import mask_tokens

    trainer = _trainer(corpus, tmp_path, f"model={corpus['bert']}", "objective=masked", "eval_batches=2",
                       "seed=3", "dropout=0")
    plan = trainer.plan

    def masked(rows, generator):
        return mask_tokens(rows[:, :-1], mask_id=plan.mask_id, vocab_size=plan.model_config.vocab_size,
                           prob=trainer.objective.cfg.mask_prob, generator=generator, special_ids=plan.special_ids)

    rows = trainer.data.batch(5)
    inputs, labels, _ = trainer._inputs(rows, 5)
    want = masked(rows, torch.Generator().manual_seed(3 * 1_000_003 + 5))
    assert torch.equal(inputs, want[0]) and torch.equal(labels, want[1])
    generator = torch.Generator().manual_seed(4)
    model = trainer.model.eval()
    losses = []
    with torch.no_grad():
        for rows in trainer.val:
            val_inputs, val_labels = masked(rows, generator)
            losses.append(float(model(val_inputs, labels=val_labels).loss))
    model.train()
    assert trainer.evaluate() == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    first = trainer.data.batch(0)  # the first step's only micro-batch, index 0
    with torch.no_grad():
        want = float(model(*masked(first, torch.Generator().manual_seed(3 * 1_000_003))[:1],
                           labels=masked(first, torch.Generator().manual_seed(3 * 1_000_003))[1]).loss)
    assert trainer.train_step()[0] == pytest.approx(want, rel=1e-5)


def test_a_float32_step_asks_for_no_autocast(corpus, tmp_path):
    trainer = _trainer(corpus, tmp_path, "precision=float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.train_step()
