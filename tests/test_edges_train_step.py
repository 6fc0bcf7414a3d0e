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
from test_edges_train_loop import _Clock, _windows
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


# -- the run around the steps --------------------------------------------------------------------


def _fake_steps(trainer, monkeypatch, losses=None, on_step=None):
    """Replace the step by a counter (the run around it is under test): loss `losses[step]`, aux
    0.5; as the real step, one with a non-finite loss is not counted."""
    import math

    def step():
        loss = losses[trainer.step] if losses else 1.0
        if math.isfinite(loss):
            trainer.step += 1
        if on_step:
            on_step(trainer.step)
        return loss, 0.5, 1.0, 1e-3

    monkeypatch.setattr(trainer, "train_step", step)
    monkeypatch.setattr(trainer, "evaluate", lambda: 2.0)


def test_throughput_is_tokens_over_the_step_time(corpus, tmp_path, monkeypatch):
    """A quarter of a second a clock read: 4× the step's tokens a second; MFU in proportion."""
    from test_train import records

    from llmctl.core.train import loop

    monkeypatch.setattr(loop, "time", _Clock(tick=0.25))
    trainer = _trainer(corpus, tmp_path, "max_steps=2", "batch_size=3", "eval_every=0")
    _fake_steps(trainer, monkeypatch)
    trainer.run()
    rows = [r for r in records(trainer.outdir) if "loss" in r]
    assert [r["tokens_per_s"] for r in rows] == [4 * 3 * 32] * 2
    assert rows[0]["mfu"] == pytest.approx(trainer.flops_per_token * 4 * 3 * 32 / trainer.peak, rel=1e-12)
    assert [r["aux_loss"] for r in rows] == [0.5, 0.5]


def test_the_last_step_is_evaluated_and_saved_once(corpus, tmp_path, monkeypatch):
    """eval_every and save_every dividing max_steps: evaluations at 2 and 4 (the last once, after
    the loop), checkpoints at 2 and 4 only."""
    trainer = _trainer(corpus, tmp_path, "max_steps=4", "eval_every=2", "save_every=2", "keep_last=5")
    _fake_steps(trainer, monkeypatch)
    evaluated, saved, save = [], [], trainer.save
    monkeypatch.setattr(trainer, "evaluate", lambda: evaluated.append(trainer.step) or 2.0)
    monkeypatch.setattr(trainer, "save", lambda: saved.append(trainer.step) or save())
    result = trainer.run()
    assert (evaluated, saved, result.val_loss) == ([2, 4], [2, 4], 2.0)


def test_a_non_finite_loss_names_its_step_and_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    from llmctl.core.train.loop import NonFiniteLoss

    trainer = _trainer(corpus, tmp_path, "max_steps=4", "save_every=2", "eval_every=0")
    _fake_steps(trainer, monkeypatch, losses=[1.0, 1.0, float("nan"), 1.0])
    with pytest.raises(NonFiniteLoss) as caught:
        trainer.run()
    assert str(caught.value) == (f"non-finite loss (nan) at step 3; the last good checkpoint is "
                                 f"{trainer.outdir / 'checkpoints' / 'step-000002'}")
    resumed = _trainer(corpus, tmp_path, "max_steps=4", "eval_every=0")
    resumed.resume_from = tmp_path / "resumed-from"
    _fake_steps(resumed, monkeypatch, losses=[float("inf")])
    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss \(inf\) at step 1; the last good checkpoint is "
                                             rf"{resumed.resume_from}$"):
        resumed.run()
    fresh = _trainer(corpus, tmp_path, "max_steps=4", "eval_every=0")
    _fake_steps(fresh, monkeypatch, losses=[float("nan")])
    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss \(nan\) at step 1$"):
        fresh.run()


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_saves_reports_and_exits_with_its_code(corpus, tmp_path, monkeypatch, signame, code):
    import os
    import signal

    from _recorder import Recorder

    trainer = _trainer(corpus, tmp_path, "max_steps=6", "save_every=0", "eval_every=0")
    trainer.report = report = Recorder()
    sig = getattr(signal, signame)
    _fake_steps(trainer, monkeypatch, on_step=lambda step: step == 2 and os.kill(os.getpid(), sig))
    result = trainer.run()
    checkpoint = trainer.outdir / "checkpoints" / "step-000002"
    assert (result.step, result.exit_code, result.checkpoint, result.val_loss) == (2, code, checkpoint, None)
    assert ("info", f"stopped by {signame} after step 2; checkpoint {checkpoint}") in report.calls
    assert not (trainer.outdir / "model.safetensors").exists()  # not published: the run is not over
    assert report.steps()[0] == ("progress", "train", 6, "step")
    updates = [kw for name, *rest in report.calls if name == "update" for kw in rest]
    assert updates[0] == {"completed": 0} and updates[1] == {"completed": 1, "loss": 1.0, "tok_s": updates[1]["tok_s"]}
    assert updates[2]["completed"] == 2 and isinstance(updates[1]["tok_s"], int) and updates[1]["tok_s"] > 0


def test_max_time_refits_on_its_own_clock_from_a_resumed_step(corpus, tmp_path, monkeypatch):
    """Refits every TIMED_STEPS timed steps counted from where the run (re)started, or when a
    twentieth of the budget has passed since the last fit (at exactly that time too); the elapsed
    time is measured from the loop's start, not from the clock's zero."""
    from llmctl.core.train import loop

    def fits(*overrides, start_step=0):
        from _recorder import Recorder

        calls = []
        monkeypatch.setattr(loop, "time", _Clock(start=100.0))
        trainer = _trainer(corpus, tmp_path, "max_steps=40", "eval_every=0", "save_every=0", *overrides)
        trainer.step, trainer.report = start_step, Recorder()
        monkeypatch.setattr(trainer, "_fit_time_budget", lambda elapsed, rate: calls.append((elapsed, rate)))
        _fake_steps(trainer, monkeypatch)
        trainer.run()
        totals = [kw["total"] for name, *rest in trainer.report.calls if name == "update" for kw in rest if "total" in kw]
        assert totals == [40] * len(calls)  # the bar's length follows each refit
        return calls

    # three clock reads a step, one before the loop: the k-th step of the run ends at 3k after the start
    assert fits("max_time=20") == [(33.0, 10 / 30), (63.0, 20 / 60), (93.0, 30 / 90)]  # the count alone
    assert fits("max_time=20", start_step=25) == [(33.0, 10 / 30)]  # 15 steps left: one refit at the 11th
    assert fits("max_time=1")[:2] == [(6.0, 1 / 3), (9.0, 2 / 6)]  # 3 s = a twentieth of a minute: every step
    assert fits("max_time=1.05")[:2] == [(9.0, 2 / 6), (15.0, 4 / 12)]  # 3.15 s: every other step
