"""The training loop's edges, in process (mutation testing of `core/train/loop.py`): resuming
a run that died after its last checkpoint, the resume checks, `--force`, the `max_time` refit by
hand, the cadence of logs, evaluations and checkpoints, the validation mean and a non-finite step;
and its helpers: the metrics log and FLOP counts (`metrics.py`), keep_sparsity's masks
(`sparsity.py`) and the precomputed reference log-probs (`reference.py`)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from _recorder import Recorder
from test_blindspots_train import _params, _rows, _trainer
from test_preference import _objective, base, pairs  # noqa: F401  (fixtures)
from test_train import FAST, corpus, curve, records  # noqa: F401  (fixture)


def _config(corpus, *overrides):
    from llmctl.config import load_config
    from llmctl.core.train.config import TrainConfig

    return load_config(TrainConfig, None, [f"data={corpus['shards']}", "model=nano", *FAST, *overrides], kind="train")


# -- resume -------------------------------------------------------------------------------------


def test_resume_after_a_death_past_the_last_checkpoint_equals_the_whole_run(corpus, tmp_path):
    """A run that died at step 6 with its newest checkpoint at step 2 (records of steps 3–6 already
    written): resuming drops those records and continues with the same weights, Adam moments,
    dropout RNG and data position, so curve and weights equal the uninterrupted run's bit for bit."""
    from llmctl.core.train.loop import run_training

    cfg = _config(corpus, "max_steps=6", "save_every=2", "eval_every=3", "keep_last=5", "dropout=0.2")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_training(cfg, whole).exit_code == 0
    shutil.copytree(whole, cut)
    for name in ("step-000004", "step-000006"):
        shutil.rmtree(cut / "checkpoints" / name)
    for f in cut.iterdir():
        if f.is_file() and f.name not in ("metrics.jsonl", "train_config.yaml"):
            f.unlink()
    assert max(r["step"] for r in records(cut)) == 6  # the dead run's records are still there
    result = run_training(cfg, cut, resume=True)
    assert (result.step, result.exit_code, result.checkpoint.name) == (6, 0, "step-000006")
    assert curve(cut) == curve(whole)
    assert (cut / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert result.val_loss == records(whole)[-1]["val_loss"]


def test_resume_keeps_a_fixed_time_budget_horizon(corpus, tmp_path):
    """A checkpoint whose `max_time` horizon was fixed restores that max_steps (the schedule's
    length); with the horizon still open, or without `max_time`, the recipe's max_steps stands."""
    trainer = _trainer(corpus, tmp_path, "max_steps=50")
    trainer.step, trainer.max_steps = 1, 7
    for fixed in (True, False):
        trainer.horizon_fixed = fixed
        trainer.save()
        timed = _resumed(corpus, trainer.outdir, "max_steps=50", "max_time=60")
        assert (timed.step, timed.max_steps, timed.horizon_fixed) == ((1, 7, True) if fixed else (1, 50, False))
        assert _resumed(corpus, trainer.outdir, "max_steps=50").max_steps == 50
        shutil.rmtree(trainer.outdir / "checkpoints")


def _resumed(corpus, outdir, *overrides, report=None):
    from llmctl.core.report import SILENT
    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.loop import Trainer

    return Trainer(make_plan(_config(corpus, *overrides), "cpu"), outdir, torch.device("cpu"), distributed.Dist(), {},
                   report=report or SILENT)


def test_resume_restores_the_objectives_state_from_as_many_processes(corpus, tmp_path, monkeypatch):
    """An objective's per-process state (GRPO's round) comes back to its rank; a checkpoint
    holding it from another number of processes is refused. Without such state the number of
    processes may change."""
    from llmctl.core.train.state import META, STATE_DIR
    from llmctl.errors import CheckpointError

    trainer = _trainer(corpus, tmp_path, "max_steps=50")
    trainer.step = 2
    trainer.save()
    meta_file = trainer.outdir / "checkpoints" / "step-000002" / STATE_DIR / META
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "world_size": 2}))
    report = Recorder()
    assert _resumed(corpus, trainer.outdir, "max_steps=50", report=report).step == 2  # no objective state
    assert report.messages() == [("info", f"resuming from {trainer.outdir / 'checkpoints' / 'step-000002'} (step 2)")]

    kind = type(trainer.objective)
    loaded = []
    monkeypatch.setattr(kind, "state", lambda self: {"round": torch.tensor([7, 8])})
    monkeypatch.setattr(kind, "load_state", lambda self, tensors: loaded.append(tensors))
    trainer.step = 3
    trainer.save()
    assert set(_resumed(corpus, trainer.outdir, "max_steps=50").objective.state()) == {"round"}
    [tensors] = loaded
    assert list(tensors) == ["round"] and torch.equal(tensors["round"], torch.tensor([7, 8]))
    meta_file = trainer.outdir / "checkpoints" / "step-000003" / STATE_DIR / META
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "world_size": 2}))
    with pytest.raises(CheckpointError, match=r"step-000003 holds per-process causal state of 2 processes; "
                                              r"resume it with as many$"):
        _resumed(corpus, trainer.outdir, "max_steps=50")


def test_force_replaces_a_run_only_once_the_new_one_has_a_checkpoint(corpus, tmp_path, monkeypatch):
    """--force over a finished run trains in `.OUTDIR.new`: a run that fails before its first
    checkpoint leaves the old run as it was (and no `.new`); one that checkpoints replaces it."""
    from llmctl.core.train import loop

    out = tmp_path / "out"
    assert loop.run_training(_config(corpus, "max_steps=2", "seed=1"), out).exit_code == 0
    old_curve, old_model = curve(out), (out / "model.safetensors").read_bytes()
    new_cfg = _config(corpus, "max_steps=3", "seed=2", "save_every=1")
    real = loop.Trainer.train_step

    def failing(self):
        if self.step == 0:
            assert self.outdir == tmp_path / ".out.new"  # where the new run is built
            raise RuntimeError("boom")
        return real(self)

    monkeypatch.setattr(loop.Trainer, "train_step", failing)
    with pytest.raises(RuntimeError, match="boom"):
        loop.run_training(new_cfg, out, force=True)
    assert curve(out) == old_curve and (out / "model.safetensors").read_bytes() == old_model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.undo()
    result = loop.run_training(new_cfg, out, force=True)
    assert result.checkpoint == out / "checkpoints" / "step-000003" and result.checkpoint.is_dir()
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3]
    assert (out / "model.safetensors").read_bytes() != old_model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002", "step-000003"]


def test_force_with_a_single_checkpoint_publishes_it_from_the_replaced_directory(corpus, tmp_path):
    """The first checkpoint of a --force run is also its last: it is published from OUTDIR, where
    the replacement moved it."""
    from llmctl.core.train import loop

    out = tmp_path / "out"
    assert loop.run_training(_config(corpus, "max_steps=2", "seed=1"), out).exit_code == 0
    old_model = (out / "model.safetensors").read_bytes()
    result = loop.run_training(_config(corpus, "max_steps=1", "seed=2"), out, force=True)
    assert result.checkpoint == out / "checkpoints" / "step-000001"
    assert (out / "model.safetensors").read_bytes() != old_model
    assert (out / "model.safetensors").read_bytes() == (result.checkpoint / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_keep_sparsity_reports_what_it_keeps_or_that_there_is_nothing(corpus, tmp_path, monkeypatch):
    from llmctl.core.train import distributed
    from llmctl.core.train import sparsity
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.loop import Trainer

    def trainer(report):
        plan = make_plan(_config(corpus, "keep_sparsity=true"), "cpu")
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        return Trainer(plan, out, torch.device("cpu"), distributed.Dist(), {}, report=report)

    dense = Recorder()
    assert not trainer(dense).masks
    assert dense.messages() == [("warn", "keep_sparsity: the model has no zero weights to keep")]
    monkeypatch.setattr(sparsity, "SparsityMasks", lambda model: type("Masks", (), {
        "zeros": 1234, "__len__": lambda self: 3})())
    sparse = Recorder()
    assert trainer(sparse).masks.zeros == 1234
    assert sparse.messages() == [("info", "keep_sparsity: 1,234 zero weights in 3 tensors stay zero")]


def test_an_objectives_extra_modules_train_and_resume_beside_the_model(corpus, tmp_path, monkeypatch):
    """Extra parameters of an objective (distill's projections) are optimised with the model,
    saved in the training state (not in the exported model) and loaded on resume."""
    from safetensors.torch import load_file

    extras = []

    def extra(self):
        if not extras:
            torch.manual_seed(len(extras))
            extras.append(torch.nn.Linear(32, 4))
        return extras[-1]

    trainer = _trainer(corpus, tmp_path, "max_steps=50")
    kind = type(trainer.objective)
    monkeypatch.setattr(kind, "extra", extra)
    trainer = _trainer(corpus, tmp_path, "max_steps=50")
    real = trainer.objective.loss
    trainer.objective.loss = lambda forward, *a: (lambda o, lm: (o + sum(p.square().sum() for p in extras[0].parameters()), lm))(
        *real(forward, *a))
    assert {id(p) for p in extras[0].parameters()} <= {id(p) for g in trainer.optimizer.param_groups
                                                       for p in g["params"]}
    first = extras[0].weight.detach().clone()
    trainer.train_step()
    assert not torch.equal(extras[0].weight, first)  # it trained
    trainer.save()
    saved = extras[0].state_dict()
    ckpt = trainer.outdir / "checkpoints" / "step-000001"
    assert not any(k.startswith("extra") for k in load_file(ckpt / "model.safetensors"))
    extras.clear()
    extras.append(torch.nn.Linear(32, 4))  # a fresh one, to be loaded
    resumed = _resumed(corpus, trainer.outdir, "max_steps=50")
    assert resumed.step == 1
    for key, value in saved.items():
        assert torch.equal(extras[0].state_dict()[key], value), key


def test_check_resume_refuses_a_shorter_run_and_another_architecture(corpus, tmp_path):
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.loop import _check_resume
    from llmctl.errors import CheckpointError, UsageError

    trainer = _trainer(corpus, tmp_path, "max_steps=5")
    _check_resume(trainer.outdir, make_plan(_config(corpus, "max_steps=1"), "cpu"))  # no checkpoint yet
    trainer.step = 3
    trainer.save()
    for steps in (3, 4):  # as long as the checkpoint's step, or longer: fine
        _check_resume(trainer.outdir, make_plan(_config(corpus, f"max_steps={steps}"), "cpu"))
    with pytest.raises(UsageError, match=r"^max_steps=2 is below step 3 of .*out0's newest checkpoint; "
                                         r"give a larger max_steps to continue it$"):
        _check_resume(trainer.outdir, make_plan(_config(corpus, "max_steps=2"), "cpu"))
    with pytest.raises(CheckpointError, match=r"step-000003 has another architecture than this run's model; resume "
                                              r"with the run's own config \(no model overrides\), or train into a "
                                              r"new OUTDIR$"):
        _check_resume(trainer.outdir, make_plan(_config(corpus, "max_steps=5", "model=micro"), "cpu"))


# -- the time budget ----------------------------------------------------------------------------


def test_fit_time_budget_by_hand(corpus, tmp_path):
    """max_steps = step + ⌊0.9 · (budget − elapsed) · rate⌋, within [step, the recipe's max_steps];
    the horizon is fixed once half the budget is spent (or nothing more fits), and announced."""
    trainer = _trainer(corpus, tmp_path, "max_steps=1000", "max_time=10", "warmup_steps=300")
    trainer.report = Recorder()
    trainer.step = 20
    trainer._fit_time_budget(120.0, 0.5)  # 20 + ⌊0.9 · 480 · 0.5⌋ = 236
    assert (trainer.max_steps, trainer.horizon_fixed, trainer.report.messages()) == (236, False, [])
    trainer._fit_time_budget(299.0, 2.0)  # 20 + ⌊0.9 · 301 · 2⌋ = 561: still under half the budget
    assert (trainer.max_steps, trainer.horizon_fixed) == (561, False)
    trainer._fit_time_budget(300.0, 1.0)  # 20 + ⌊0.9 · 300⌋ = 290: half spent, fixed
    assert (trainer.max_steps, trainer.horizon_fixed) == (290, True)
    assert trainer.report.messages() == [
        ("info", "max_time 10 min: training 290 steps"),
        ("warn", "warmup_steps=300 is longer than the 290 steps that fit in max_time: lr never reaches 0.0003")]
    trainer.report.calls.clear()
    trainer._fit_time_budget(10.0, 100.0)  # more than the recipe's max_steps fits
    assert (trainer.max_steps, trainer.horizon_fixed, trainer.report.messages()) == (1000, False, [])
    trainer._fit_time_budget(700.0, 1.0)  # past the budget: nothing more fits
    assert (trainer.max_steps, trainer.horizon_fixed) == (20, True)
    trainer.cfg.warmup_steps = 20  # as long as the run: no warning
    trainer.report.calls.clear()
    trainer._fit_time_budget(590.0, 0.1)
    assert trainer.report.messages() == [("info", "max_time 10 min: training 20 steps")]


def test_fit_time_budget_takes_the_mean_rate_of_the_ranks(corpus, tmp_path, monkeypatch):
    """Under DDP every rank times the same steps: the summed rates over the ranks are one rate."""
    from llmctl.core.train import distributed, loop

    trainer = _trainer(corpus, tmp_path, "max_steps=1000", "max_time=10")
    trainer.step, trainer.d = 20, distributed.Dist(rank=0, world=2)
    monkeypatch.setattr(loop.dist_, "all_reduce_sum", lambda values, d, device: [2 * v for v in values])
    trainer._fit_time_budget(120.0, 0.5)  # both ranks at 0.5 steps/s: 20 + ⌊0.9 · 480 · 0.5⌋
    assert trainer.max_steps == 236


# -- the run ------------------------------------------------------------------------------------


def test_logs_evaluations_and_checkpoints_follow_their_cadence(corpus, tmp_path):
    """log_every=3, eval_every=3, save_every=3, keep_last=2 over 7 steps: losses at 3, 6 and the
    last step; evaluations at 3, 6 and once at the end (not twice at 6 or 7); checkpoints 6 and 7
    kept; OUTDIR holds step 7's model files, linked; the final val loss in its llmctl.json."""
    trainer = _trainer(corpus, tmp_path, "max_steps=7", "log_every=3", "eval_every=3", "save_every=3", "keep_last=2")
    result = trainer.run()
    out = trainer.outdir
    rows = records(out)
    assert [r["step"] for r in rows if "loss" in r] == [3, 6, 7]
    assert [r["step"] for r in rows if "val_loss" in r and "task" not in r] == [3, 6, 7]
    assert all("aux_loss" not in r for r in rows)  # a dense model: no auxiliary loss
    assert result.val_loss == rows[-1]["val_loss"]
    [final] = json.loads((out / "llmctl.json").read_text())["metrics"]  # the published checkpoint's
    assert {k: v for k, v in final.items() if k != "time"} == {
        "task": "val_loss", "step": 7, "val_loss": result.val_loss, "val_ppl": pytest.approx(math.exp(result.val_loss))}
    ids = trainer.plan.model_config  # the special tokens of the shards' tokenizer
    assert (ids.eos_token_id, ids.pad_token_id) == (trainer.plan.shards.manifest["eos_id"], 1)
    assert json.loads((out / "generation_config.json").read_text()) == {
        "_from_model_config": True, "bos_token_id": ids.bos_token_id, "eos_token_id": ids.eos_token_id,
        "pad_token_id": 1}
    lineage = json.loads((result.checkpoint / "llmctl.json").read_text())
    assert lineage["metrics"] == [] and lineage["step"] == 7  # not the linked file
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006", "step-000007"]
    assert (result.step, result.exit_code, result.checkpoint) == (7, 0, out / "checkpoints" / "step-000007")
    for f in result.checkpoint.iterdir():
        if f.is_file() and f.name != "llmctl.json":  # rewritten with the final val loss
            assert (out / f.name).samefile(f)
    loss = [r for r in rows if "loss" in r]
    assert all(r["lr"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in loss)


class _Clock:
    """perf_counter for the loop: each call `tick` seconds later, from `start`."""

    def __init__(self, start: float = 0.0, tick: float = 1.0):
        self.now, self.tick = start - tick, tick

    def perf_counter(self):
        self.now += self.tick
        return self.now


def test_throughput_and_mfu_from_the_step_time(corpus, tmp_path, monkeypatch):
    """Each step's tokens/s is the step's tokens over its time (one second here), and MFU the
    model's FLOPs at that rate over the peak (peak_tflops=1): 6·N + 12·layers·d·seq per token."""
    from llmctl.core.train import loop

    monkeypatch.setattr(loop, "time", _Clock())
    trainer = _trainer(corpus, tmp_path, "max_steps=2", "batch_size=3", "grad_accum=2", "eval_every=0")
    cfg, model = trainer.model.cfg, trainer.model
    n = sum(p.numel() for p in model.parameters()) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)
    flops = 6 * n + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 32
    trainer.run()
    for r in [r for r in records(trainer.outdir) if "loss" in r]:
        assert r["tokens_per_s"] == 3 * 32 * 2 and r["mfu"] == pytest.approx(flops * 3 * 32 * 2 / 1e12, rel=1e-12)


def test_max_time_refits_every_ten_timed_steps_or_sooner_when_slow(corpus, tmp_path, monkeypatch):
    """With `max_time`, the first step is not timed; the horizon is refitted every TIMED_STEPS
    timed steps from the elapsed time and the timed steps' rate, or as soon as a twentieth of
    the budget has passed since the last fit."""
    from llmctl.core.train import loop

    def fits(*overrides):
        clock, calls = _Clock(), []
        monkeypatch.setattr(loop, "time", clock)
        trainer = _trainer(corpus, tmp_path, "max_steps=22", "eval_every=0", "save_every=0", *overrides)
        monkeypatch.setattr(trainer, "_fit_time_budget", lambda elapsed, rate: calls.append((elapsed, rate)))

        def step():  # the timing, not the training, is under test
            trainer.step += 1
            return 1.0, 0.0, 1.0, 1e-3

        monkeypatch.setattr(trainer, "train_step", step)
        trainer.run()
        return calls

    # three clock reads a step (start, end, now), one before the loop: step k ends at 3k
    assert fits("max_time=10") == [(33.0, 10 / 30), (63.0, 20 / 60)]  # steps 11 and 21
    assert fits("max_time=0.1")[:3] == [(6.0, 1 / 3), (9.0, 2 / 6), (12.0, 3 / 9)]  # 6 s each: every step
    assert fits() == []  # no budget, no refit


def test_a_run_without_validation_data(corpus, tmp_path):
    """Raw text with val_fraction=0: nothing to validate, so no val records, no final val loss."""
    from llmctl.core.train.loop import run_training

    cfg = _config(corpus, f"data={corpus['text']}", f"tokenizer={corpus['tok']}", "val_fraction=0", "max_steps=2",
                  "eval_every=1")
    out = tmp_path / "out"
    result = run_training(cfg, out)
    assert (result.step, result.val_loss) == (2, None)
    assert [r["step"] for r in records(out)] == [1, 2] and all("val_loss" not in r for r in records(out))
    assert json.loads((out / "llmctl.json").read_text())["metrics"] == []


def _windows(ids: list[int], count: int, seq: int = 32) -> torch.Tensor:
    """The first `count` rows a text stream cuts: seq + 1 tokens every seq tokens."""
    return torch.tensor([ids[i * seq:i * seq + seq + 1] for i in range(count)])


def test_text_data_train_and_validation_rows(corpus, tmp_path):
    """On raw text the rows are the encoded text (+ EOS) in windows of seq_len + 1; validation
    comes from val_data's files when given, else from the text's last val_fraction (cut after a
    newline); validation takes eval_batches batches from one pass over its text."""
    text = corpus["text"].read_bytes()
    val = tmp_path / "val.txt"
    val.write_text(corpus["text"].read_text(encoding="utf-8")[:3000], encoding="utf-8")
    given = _trainer(corpus, tmp_path, f"data={corpus['text']}", f"tokenizer={corpus['tok']}", f"val_data={val}",
                     "eval_batches=3", "batch_size=2")
    tok = given.plan.tokenizer
    encode = lambda data: tok.encode(data.decode("utf-8")) + [tok.eos_id]  # noqa: E731
    assert torch.equal(torch.cat(given.val), _windows(encode(val.read_bytes()), 6))
    assert torch.equal(torch.cat([given.data.batch(0), given.data.batch(1)]), _windows(encode(text), 4))

    held = _trainer(corpus, tmp_path, f"data={corpus['text']}", f"tokenizer={corpus['tok']}", "val_fraction=0.25",
                    "eval_batches=2", "batch_size=2")
    cut = text.index(b"\n", int(len(text) * 0.75)) + 1
    assert torch.equal(torch.cat(held.val), _windows(encode(text[cut:]), 4))
    assert torch.equal(held.data.batch(0), _windows(encode(text[:cut]), 2))


def test_evaluate_is_the_mean_loss_in_eval_mode(corpus, tmp_path):
    """The validation loss is the mean of the model's loss over the fixed validation batches,
    with dropout off; the model trains again afterwards."""
    trainer = _trainer(corpus, tmp_path, "dropout=0.5", "eval_batches=3")
    model = trainer.model
    assert len(trainer.val) == 3 and model.training
    model.eval()
    with torch.no_grad():
        losses = [float(model(inputs, labels=labels).loss)
                  for inputs, labels, _ in (trainer._inputs(rows, i) for i, rows in enumerate(trainer.val))]
    model.train()
    assert trainer.evaluate() == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert model.training and trainer.trained.training
    trainer.val = []
    assert trainer.evaluate() is None


def test_a_non_finite_loss_skips_the_update(corpus, tmp_path):
    """A NaN loss: no optimizer step, no gradients kept, the step not counted; the loss returned."""
    trainer = _trainer(corpus, tmp_path, rows=_rows(2))
    before = _params(trainer)
    real = trainer.objective.loss
    trainer.objective.loss = lambda *a: tuple(x * float("nan") for x in real(*a))
    loss, aux, norm, lr = trainer.train_step()
    assert math.isnan(loss) and aux == 0.0 and math.isnan(norm) and lr > 0
    assert trainer.step == 0 and all(p.grad is None for p in trainer.model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in _params(trainer).items())
    assert not trainer.optimizer.state  # Adam never stepped


def test_val_record_and_generation_config():
    from types import SimpleNamespace

    from llmctl.core.train.loop import Trainer, generation_config

    lm = SimpleNamespace(objective=SimpleNamespace(perplexity=True))
    assert Trainer._val_record(lm, 2.0) == {"val_loss": 2.0, "val_ppl": math.exp(2.0)}
    assert Trainer._val_record(lm, 80.0) == {"val_loss": 80.0, "val_ppl": math.exp(50.0)}  # capped, not inf
    other = SimpleNamespace(objective=SimpleNamespace(perplexity=False))
    assert Trainer._val_record(other, 2.0) == {"val_loss": 2.0}
    cfg = SimpleNamespace(bos_token_id=0, eos_token_id=1, pad_token_id=None)
    assert generation_config(cfg) == {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1}
    assert generation_config(SimpleNamespace()) == {"_from_model_config": True}


# -- OUTDIR -------------------------------------------------------------------------------------


def test_latest_checkpoint_publish_and_leftovers(tmp_path, monkeypatch):
    """The newest complete checkpoint (a directory without its training state is not one);
    publishing links its files into OUTDIR, config.json last, and again is a no-op; a dead
    writer's temporary files and checkpoints are removed, nothing else."""
    import os

    from llmctl.core.train import loop

    out = tmp_path / "run"
    assert loop.latest_checkpoint(out) is None
    for step in (2, 10, 4, 12):
        ckpt = out / "checkpoints" / f"step-{step:06d}"
        (ckpt / "trainer_state").mkdir(parents=True)
        if step != 12:
            (ckpt / "trainer_state" / "state.json").write_text("{}")
    assert loop.latest_checkpoint(out) == out / "checkpoints" / "step-000010"
    newest = out / "checkpoints" / "step-000010"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (newest / name).write_text(name)
    order = []
    real = os.replace
    monkeypatch.setattr(loop.os, "replace", lambda src, dst: (order.append(os.path.basename(dst)), real(src, dst)))

    class Listed(type(newest)):  # lists config.json first: publishing must still link it last
        def iterdir(self):
            return iter(sorted(super().iterdir()))

    loop.publish(Listed(newest), out)
    assert order[-1] == "config.json" and sorted(order) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert all((out / name).samefile(newest / name) for name in order)
    order.clear()
    loop.publish(newest, out)  # already published: nothing renamed
    assert order == []
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "model.safetensors",
                                                     "tokenizer.json"]
    (out / "config.json").unlink()  # a publish that died before its last file
    loop.publish(newest, out)
    assert order == ["config.json"] and (out / "config.json").samefile(newest / "config.json")

    def cross_device(src, dst):
        raise OSError("Invalid cross-device link")

    monkeypatch.setattr(loop.os, "link", cross_device)  # no hard links: copies
    copy = tmp_path / "copy"
    copy.mkdir()
    loop.publish(newest, copy)
    assert sorted(p.name for p in copy.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert all((copy / n).read_text() == n and not (copy / n).samefile(newest / n) for n in order[1:])
    (out / ".model.safetensors.tmp-99").write_text("x")
    (out / "checkpoints" / ".step-000014.tmp-99").mkdir()
    (out / "keep.tmp-99").write_text("x")
    loop._remove_leftovers(out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "keep.tmp-99",
                                                     "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-000002", "step-000004", "step-000010", "step-000012"]


def test_check_outdir(tmp_path):
    from llmctl.core.train.loop import check_outdir
    from llmctl.errors import OutputExistsError

    empty = tmp_path / "empty"
    empty.mkdir()
    check_outdir(empty, resume=True, force=False)  # an empty directory resumes (as a fresh run)
    check_outdir(tmp_path / "new", resume=True, force=False)
    check_outdir(tmp_path / "new", resume=False, force=False)
    with pytest.raises(OutputExistsError, match="already exists"):
        check_outdir(empty, resume=False, force=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"--resume: .*other exists but is not an llmctl train output"):
        check_outdir(other, resume=True, force=False)
    with pytest.raises(OutputExistsError, match="--resume"):
        check_outdir(other / "notes.txt", resume=True, force=False)


# -- metrics (`core/train/metrics.py`) ----------------------------------------------------------


def test_metrics_log_truncate_and_read(tmp_path, monkeypatch):
    """Records are appended and flushed line by line, numbers mirrored to TensorBoard (when
    installed) at their step; truncating keeps the records up to a step (and those without one),
    dropping blank and torn lines; reading skips a torn line."""
    import sys
    import types

    from llmctl.core.train import metrics

    scalars = []

    class Writer:
        def __init__(self, logdir):
            scalars.append(("dir", logdir))

        def add_scalar(self, key, value, step):
            scalars.append((key, value, step))

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    log = metrics.MetricsLog(tmp_path, tensorboard=True)
    log.log({"step": 1, "loss": 2.5, "lr": 1e-3, "note": "x", "flag": True})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.5, "lr": 1e-3, "note": "x",
                                                                   "flag": True}  # flushed before closing
    log.log({"step": 3, "val_loss": 2.0})
    log.close()
    assert scalars == [("dir", str(tmp_path / "tensorboard")), ("loss", 2.5, 1), ("lr", 1e-3, 1), ("flag", True, 1),
                       ("val_loss", 2.0, 3), "closed"]
    plain = metrics.MetricsLog(tmp_path, tensorboard=False)
    assert plain._tb is None
    plain.log({"step": 4, "loss": 1.0})
    plain.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a blank line, no step, a torn line, then more
        f.write('\n{"task": "note"}\n{"step": 5, "loss": 0.5}\n{"step": 6, "lo\n{"step": 6, "loss": 0.25}\n')
    assert [r.get("step") for r in metrics.read_metrics(tmp_path)] == [1, 3, 4, None, 5, 6]
    metrics.truncate_metrics(tmp_path, 3)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [
        '{"step": 1, "loss": 2.5, "lr": 0.001, "note": "x", "flag": true}', '{"step": 3, "val_loss": 2.0}',
        '{"task": "note"}']
    metrics.truncate_metrics(tmp_path, 0)  # a fresh run's: records without a step stay
    assert (tmp_path / "metrics.jsonl").read_text() == '{"task": "note"}\n'
    metrics.truncate_metrics(tmp_path / "nothing", 0)  # no metrics file: nothing written
    assert not (tmp_path / "nothing").exists()


def test_flops_per_token_is_palms_count():
    """6·N + 12·L·H·Dh·T, N without an untied input embedding table (its lookup is not a matmul)."""
    from llmctl.core.model.build import build_model
    from llmctl.core.model.config import ModelConfig
    from llmctl.core.train.metrics import flops_per_token

    for tied in (True, False):
        cfg = ModelConfig(vocab_size=100, hidden_size=24, num_layers=2, num_heads=3, max_seq_len=16,
                          tie_embeddings=tied)
        model = build_model(cfg)
        n = sum(p.numel() for p in model.parameters())
        matmul = n if tied else n - 100 * 24
        assert flops_per_token(model, 16) == 6 * matmul + 12 * 2 * 3 * 8 * 16


def test_peak_flops_measured_where_no_datasheet(monkeypatch):
    """A CPU, or a GPU missing from the table, gets a timed matmul probe (larger and longer on a
    GPU); the probe counts 2·size³ FLOPs a product over the time it ran, and draws no random numbers."""
    from llmctl.core.train import metrics

    calls = []
    monkeypatch.setattr(metrics, "measure_matmul_peak",
                        lambda dtype, device, **kw: calls.append((dtype, device, kw)) or 5.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Mystery 9000")
    gpu, cpu = torch.device("cuda", 1), torch.device("cpu")
    assert metrics.peak_flops(torch.bfloat16, gpu) == 5.0
    assert metrics.peak_flops(torch.float32, cpu) == 5.0
    assert calls == [(torch.bfloat16, gpu, {"size": 8192, "seconds": 1.0}), (torch.float32, cpu, {})]
    monkeypatch.undo()

    class Clock:  # a quarter of a second per read from 10 s: 10.25, 10.5, 10.75 run a product each, 11 stops
        t = 9.75

        def perf_counter(self):
            Clock.t += 0.25
            return Clock.t

    monkeypatch.setattr(metrics, "time", Clock())
    rng = torch.get_rng_state()
    assert metrics.measure_matmul_peak(torch.float32, torch.device("cpu"), size=8, seconds=1.0) == 2 * 8**3 * 3 / 1.25
    assert torch.equal(torch.get_rng_state(), rng)


def test_gpu_peak_table_is_most_specific_first():
    """A GPU whose name holds two keys of the table (an H100 PCIe also says H100) matches the
    more specific one, listed first."""
    from llmctl.core.train.metrics import GPU_PEAK_TFLOPS

    keys = [key for key, _ in GPU_PEAK_TFLOPS]
    for i, key in enumerate(keys):
        assert not any(other in key for other in keys[:i]), key


# -- keep_sparsity (`core/train/sparsity.py`) ---------------------------------------------------


def test_sparsity_masks_keep_the_blocks_trainable_matrices_zeros():
    """Masks are the zeros of the trainable 2-D weights inside blocks (not the embeddings, not a
    norm's vector, not a frozen weight, not a dense matrix); `apply` zeroes those entries again
    and leaves every other value as the optimizer left it."""
    from llmctl.core.model.build import build_model
    from llmctl.core.model.config import ModelConfig
    from llmctl.core.train.sparsity import SparsityMasks

    model = build_model(ModelConfig(vocab_size=100, hidden_size=24, num_layers=2, num_heads=3, max_seq_len=16))
    layers = model.model.layers
    with torch.no_grad():
        layers[0].self_attn.q_proj.weight[:3, :4] = 0  # 12 zeros: kept
        layers[1].mlp.down_proj.weight[5] = 0  # 96 zeros: kept
        layers[1].self_attn.v_proj.weight[0, 0] = 0  # frozen below: not kept
        layers[0].input_layernorm.weight[0] = 0  # a vector: not kept
        model.model.embed_tokens.weight[0] = 0  # outside the blocks: not kept
    layers[1].self_attn.v_proj.weight.requires_grad_(False)
    assert not SparsityMasks(build_model(ModelConfig(vocab_size=100, hidden_size=24, num_layers=2, num_heads=3,
                                                     max_seq_len=16)))  # a dense model: no masks
    masks = SparsityMasks(model)
    assert len(masks) == 2 and masks.zeros == 12 + 96
    assert [p is w for (p, _), w in zip(masks.masks, (layers[0].self_attn.q_proj.weight,
                                                      layers[1].mlp.down_proj.weight))] == [True, True]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # an optimizer step that moved everything
    masks.apply()
    for name, p in model.named_parameters():
        moved = before[name] + 1.0
        if name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            moved = moved.masked_fill(before[name] == 0, 0.0)
        assert torch.equal(p.detach(), moved), name


# -- precomputed reference log-probs (`core/train/reference.py`) --------------------------------


def test_reference_cache_key_read_and_write(tmp_path, monkeypatch):
    """The cache beside the first data file is keyed by the base checkpoint, the precision and
    each part's name and rows (sha256, 16 hex digits); a damaged cache, or one missing a part or
    of other shapes, reads as absent; a cache that cannot be written is a warning."""
    import hashlib
    from types import SimpleNamespace

    from safetensors.torch import save_file

    import llmctl.core.checkpoint
    from llmctl.core.train import reference

    monkeypatch.setattr(llmctl.core.checkpoint, "checkpoint_hash", lambda path: f"hash-of-{path}")
    data = tmp_path / "pairs.jsonl"
    train, val = torch.arange(24).reshape(3, 2, 2, 2), torch.arange(8).reshape(1, 2, 2, 2)
    plan = SimpleNamespace(init_from="BASE", precision="float32", text_files=[data, tmp_path / "more.jsonl"])
    digest = hashlib.sha256(b"hash-of-BASE float32")
    for name, rows in (("train", train), ("val", val)):
        digest.update(name.encode())
        digest.update(rows.numpy().tobytes())
    path = reference._cache_path(plan, {"train": train, "val": val})
    assert path == tmp_path / f".pairs.jsonl.ref-{digest.hexdigest()[:16]}.safetensors"
    others = [reference._cache_path(SimpleNamespace(**{**vars(plan), key: value}), {"train": train, "val": val})
              for key, value in (("init_from", "OTHER"), ("precision", "bfloat16"))]
    others += [reference._cache_path(plan, parts) for parts in ({"train": train}, {"val": train, "train": val},
                                                                  {"train": train + 1, "val": val})]
    assert len({path, *others}) == 6

    parts = {"train": train, "val": val}
    logps = {"train": torch.randn(3, 2, dtype=torch.float64), "val": torch.randn(1, 2, dtype=torch.float64)}
    warnings = []
    report = SimpleNamespace(warn=warnings.append)
    reference._write(path, logps, report)
    read = reference._read(path, parts)
    assert read.keys() == logps.keys() and all(torch.equal(read[k], logps[k]) for k in logps)
    reference._write(path, {"train": logps["train"]}, report)  # replaced (force): a part missing
    assert reference._read(path, parts) is None
    save_file({"train": torch.zeros(3, 3), "val": torch.zeros(1, 2)}, str(path))  # another shape
    assert reference._read(path, parts) is None
    path.write_bytes(b"not safetensors")
    assert reference._read(path, parts) is None
    assert warnings == []
    blocked = tmp_path / "file"
    blocked.write_text("x")
    reference._write(blocked / "cache.safetensors", logps, report)  # its directory is a file
    [warning] = warnings
    assert warning.startswith("precompute_ref: could not cache the reference log-probs beside the data (")


def test_reference_logps_are_each_pairs_base_model_sums_in_any_chunks(base, pairs, tmp_path):
    """`_compute` scores every pair with the base checkpoint, batch_size pairs at a time (5 here,
    not dividing the training pairs): column 0 the chosen, column 1 the rejected completion's log-prob
    sum, as the base model gives for that pair alone."""
    from llmctl.core.model.io import load_model
    from llmctl.core.train import reference
    from llmctl.core.train.preference import sequence_logps

    data = tmp_path / "pairs.jsonl"
    shutil.copy(pairs / "pairs.jsonl", data)
    objective, _, _ = _objective(base, data, "dpo", "adapter.method=full", "batch_size=5")
    rows = objective.plan.prepared["train"]
    assert len(rows) % 5
    sums = reference._compute(objective, {"train": rows})["train"]
    model = load_model(base, dtype=torch.float32)[0].eval()
    with torch.no_grad():
        for i in range(len(rows)):
            inputs, labels, _ = objective.batch(rows[i:i + 1], 0)
            chosen, rejected = sequence_logps(model, model, inputs, labels)[0].sums
            assert sums[i].tolist() == pytest.approx([float(chosen), float(rejected)], abs=1e-4)
    assert sums[:, 0].ne(sums[:, 1]).all()


def test_reference_logps_travel_as_float64_bits_without_a_validation_split(base, pairs, tmp_path, monkeypatch):
    """Without validation rows the training rows alone get a third channel whose column 0 holds each
    sequence's log-prob sum as float64 bits; a cache that cannot be written is the run's warning."""
    from types import SimpleNamespace

    import llmctl.core.io
    from llmctl.core.train import reference

    data = tmp_path / "pairs.jsonl"
    shutil.copy(pairs / "pairs.jsonl", data)
    objective, _, _ = _objective(base, data, "dpo", "adapter.method=full", "batch_size=8")
    warnings = []
    objective.plan.report = SimpleNamespace(warn=warnings.append, progress=objective.plan.report.progress)

    def unwritable(*args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr(llmctl.core.io, "atomic_file", unwritable)
    rows = objective.plan.prepared["train"][:5]
    train, val = reference.with_reference_logps(objective, rows, None)
    assert val is None and train.shape == (5, 2, 3, rows.shape[-1])
    assert torch.equal(train[:, :, :2], rows) and not train[:, :, 2, 1:].any()
    sums = reference._compute(objective, {"train": rows})["train"]
    assert torch.equal(train[:, :, 2, 0].view(torch.float64), sums.double())
    assert warnings == ["precompute_ref: could not cache the reference log-probs beside the data "
                        "(read-only file system)"]
