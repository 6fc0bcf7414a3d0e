"""The set-up around a training run (mutation testing of `core/train/loop.py`'s `run_training`,
`Trainer.__init__`, `describe_data` and `check_outdir`): what the lineage records of the data,
the config file and the parents, the output checks and the lock, `--force` with `resume: auto`,
a dead run's metrics, and how the trainer is built from a parent checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import yaml

from _recorder import Recorder
from test_preference import base, pairs  # noqa: F401  (fixtures)
from test_train import FAST, corpus, records  # noqa: F401  (fixture)


def _config(corpus, *overrides, data=None):
    from llmctl.config import load_config
    from llmctl.core.train.config import TrainConfig

    return load_config(TrainConfig, None, [f"data={data or corpus['shards']}", "model=nano", *FAST, "max_steps=1",
                                           *overrides], kind="train")


def _lineage(checkpoint) -> dict:
    return json.loads((checkpoint / "llmctl.json").read_text(encoding="utf-8"))


# -- the lineage ----------------------------------------------------------------------------------


def test_the_lineage_names_each_text_file_with_its_size_the_validation_files_and_the_tokenizer(corpus, tmp_path):
    from llmctl.core.train.loop import run_training

    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    text = corpus["text"].read_text(encoding="utf-8")
    train.write_text(text[:20_000], encoding="utf-8")
    val.write_text(text[20_000:24_000], encoding="utf-8")
    cfg = _config(corpus, f"tokenizer={corpus['tok']}", f"val_data={val}", data=train)
    out = tmp_path / "run"
    assert run_training(cfg, out).exit_code == 0
    lineage = _lineage(out)
    assert lineage["command"] == "train"
    assert lineage["data"] == {"text_files": [{"path": os.path.realpath(train), "bytes": os.path.getsize(train)}],
                               "val_files": [os.path.realpath(val)], "tokenizer": os.path.realpath(corpus["tok"])}


def test_the_lineage_of_a_sharded_run_is_the_shards_folder_and_its_manifest(corpus, tmp_path):
    from llmctl.core.train.loop import run_training

    out = tmp_path / "run"
    assert run_training(_config(corpus), out).exit_code == 0
    manifest = json.loads((corpus["shards"] / "manifest.json").read_text(encoding="utf-8"))
    assert _lineage(out)["data"] == {"path": os.path.realpath(corpus["shards"]), **manifest}


def test_the_config_file_is_the_resolved_config_in_field_order_and_the_lineage_holds_it(corpus, tmp_path):
    from llmctl.core.train.config import TrainConfig
    from llmctl.core.train.loop import run_training

    out = tmp_path / "run"
    assert run_training(_config(corpus, "lr=0.0025", "seed=7"), out).exit_code == 0
    text = (out / "train_config.yaml").read_text(encoding="utf-8")
    saved = yaml.safe_load(text)
    assert list(saved) == [f.name for f in dataclasses.fields(TrainConfig)]  # as written, not sorted
    assert (saved["lr"], saved["seed"], saved["max_steps"]) == (0.0025, 7, 1)
    assert saved["data"] == [str(corpus["shards"])]
    assert _lineage(out)["config"] == saved


def test_the_saved_recipe_names_relative_paths_absolutely_so_resume_reads_them_from_anywhere(corpus, tmp_path,
                                                                                            monkeypatch):
    """`data=data` typed in one directory must not mean another directory's `data` on `--resume`; preset
    and template names, and paths that do not exist, stay as typed."""
    import shutil

    from llmctl.core.train.config import anchor_paths
    from llmctl.core.train.loop import run_training

    work = tmp_path / "work"
    shutil.copytree(corpus["shards"], work / "data")
    monkeypatch.chdir(work)
    assert run_training(_config(corpus, data="data"), work / "run").exit_code == 0
    saved = yaml.safe_load((work / "run" / "train_config.yaml").read_text(encoding="utf-8"))
    assert saved["data"] == [str(work / "data")] and saved["model"] == "nano"
    assert anchor_paths({"data": ["*.txt", "-"], "objective_args": {"teacher": "data", "temperature": "data"},
                         "chat_template": "chatml", "tokenizer": "gone"}) == \
        {"data": [str(work / "*.txt"), "-"], "objective_args": {"teacher": str(work / "data"), "temperature": "data"},
         "chat_template": "chatml", "tokenizer": "gone"}


def test_a_run_from_a_checkpoint_names_it_as_its_parent_with_its_fingerprint(corpus, tmp_path, monkeypatch):
    """The parent is the checkpoint's resolved path and `checkpoint_hash`, which differs from
    another checkpoint's; the trainer loads it in float32 with this run's settings."""
    from llmctl.core.checkpoint import checkpoint_hash
    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.loop import Trainer, run_training

    first = tmp_path / "first"
    assert run_training(_config(corpus, "precision=bf16"), first).exit_code == 0
    monkeypatch.chdir(tmp_path)  # a relative path is recorded resolved
    second = tmp_path / "second"
    assert run_training(_config(corpus, "model=first", "seed=3"), second).exit_code == 0
    parents = _lineage(second)["parents"]
    assert parents == [{"path": str(first.resolve()), "hash": checkpoint_hash(first)}]
    assert parents[0]["hash"] != checkpoint_hash(second) and len(parents[0]["hash"]) == 64

    import shutil

    from safetensors.torch import load_file, save_file

    half = tmp_path / "half"  # the parent's weights stored in bfloat16: the run trains float32 weights
    shutil.copytree(first, half, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
    stored = {k: v.to(torch.bfloat16) for k, v in load_file(first / "model.safetensors").items()}
    save_file(stored, half / "model.safetensors", metadata={"format": "pt"})
    plan = make_plan(_config(corpus, f"model={half}", "dropout=0.3"), "cpu")
    trainer = Trainer(plan, tmp_path / "third", torch.device("cpu"), distributed.Dist(), {})
    weights = trainer.model.state_dict()
    assert all(weights[k].dtype == torch.float32 and torch.equal(weights[k], v.float()) for k, v in stored.items())
    cfg = trainer.model.cfg
    assert (cfg.embedding_dropout, cfg.attention_dropout, cfg.residual_dropout) == (0.3, 0.3, 0.3)


# -- the output checks and the lock ---------------------------------------------------------------


def test_an_existing_output_is_refused_unless_forced_and_nothing_is_written(corpus, tmp_path):
    from llmctl.core.train.loop import run_training
    from llmctl.errors import OutputExistsError

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(OutputExistsError, match=f"output {out} already exists .use --resume to continue it or "
                                                 "--force to start over."):
        run_training(_config(corpus), out)
    with pytest.raises(OutputExistsError, match="not an llmctl train output"):
        run_training(_config(corpus), out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and [p.name for p in out.iterdir()] == ["notes.txt"]


def test_force_will_not_replace_a_folder_that_holds_the_runs_data(corpus, tmp_path):
    import shutil

    from llmctl.core.train.loop import run_training
    from llmctl.errors import UsageError

    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(corpus["shards"], out / "shards")
    with pytest.raises(UsageError, match=f"--force will not replace {out}: it holds the input"):
        run_training(_config(corpus, data=out / "shards"), out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["shards"]


def test_a_second_writer_is_refused_while_the_output_is_locked(corpus, tmp_path):
    from llmctl.core.outputs import output_lock
    from llmctl.core.train.loop import run_training
    from llmctl.errors import OutputLocked

    out = tmp_path / "run"
    with output_lock(out):
        with pytest.raises(OutputLocked, match=f"output {out} is being written by process {os.getpid()}"):
            run_training(_config(corpus), out)
    assert not out.exists()


def test_an_output_below_folders_that_do_not_exist_yet_is_made_with_them(corpus, tmp_path):
    from llmctl.core.train.loop import run_training

    out = tmp_path / "a" / "b" / "run"
    result = run_training(_config(corpus), out)
    assert (result.exit_code, result.step) == (0, 1) and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["run"]  # the lock is gone


# -- resume and force ---------------------------------------------------------------------------


def test_force_with_resume_continues_the_run_instead_of_replacing_it(corpus, tmp_path):
    """`resume: auto` in a recipe with --force: the newest checkpoint is resumed (force only
    replaces a run that is not resumed), as the report says."""
    from llmctl.core.train.loop import run_training

    out = tmp_path / "run"
    assert run_training(_config(corpus, "max_steps=2"), out).exit_code == 0
    report = Recorder()
    result = run_training(_config(corpus, "max_steps=3"), out, resume=True, force=True, report=report)
    assert result.step == 3
    ckpt = out / "checkpoints" / "step-000002"
    assert ("info", f"resuming from {ckpt} (step 2)") in report.messages()
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_resuming_a_run_that_died_before_its_first_checkpoint_starts_its_metrics_over(corpus, tmp_path):
    """Its records (steps 1 to 3, no checkpoint) are dropped: the metrics equal a fresh run's."""
    from llmctl.core.train.loop import run_training

    fresh = tmp_path / "fresh"
    assert run_training(_config(corpus, "max_steps=2"), fresh).exit_code == 0
    dead = tmp_path / "dead"
    dead.mkdir()
    (dead / "train_config.yaml").write_text((fresh / "train_config.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    (dead / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 99.0}) + "\n" for s in (1, 2, 3)),
                                        encoding="utf-8")
    assert run_training(_config(corpus, "max_steps=2"), dead, resume=True).exit_code == 0
    comparable = [(r["step"], r.get("loss"), r.get("val_loss")) for r in records(dead)]
    assert comparable == [(r["step"], r.get("loss"), r.get("val_loss")) for r in records(fresh)]
    assert all(r.get("loss") != 99.0 for r in records(dead))


# -- what the trainer is built with -------------------------------------------------------------


def test_tokens_per_step_are_the_tokens_the_step_reads_and_the_peak_is_the_recipes(corpus, tmp_path):
    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.loop import Trainer

    plan = make_plan(_config(corpus, "grad_accum=3", "batch_size=2", "seq_len=16", "peak_tflops=2.5"), "cpu")
    trainer = Trainer(plan, tmp_path / "run", torch.device("cpu"), distributed.Dist(), {})
    read = sum(trainer.data.batch(i)[:, 1:].numel() for i in range(3))  # inputs of the step's 3 micro-batches
    assert trainer.tokens_per_step == read == 2 * 16 * 3
    assert trainer.peak == 2.5e12


def test_without_a_peak_in_the_recipe_the_devices_peak_for_the_precision_is_used(corpus, tmp_path, monkeypatch):
    from llmctl.core.train import distributed, loop
    from llmctl.core.train.build import make_plan

    asked = []
    monkeypatch.setattr(loop, "peak_flops", lambda dtype, device: asked.append((dtype, device)) or 123.0)
    plan = make_plan(_config(corpus, "peak_tflops=0", "precision=bf16"), "cpu")
    trainer = loop.Trainer(plan, tmp_path / "run", torch.device("cpu"), distributed.Dist(), {})
    assert trainer.peak == 123.0 and asked == [(torch.bfloat16, torch.device("cpu"))]


def test_a_dpo_runs_reference_copy_is_frozen_and_in_eval_mode_through_a_step(base, pairs, tmp_path):  # noqa: F811
    """The reference model (a copy of the base) takes no gradients and is not changed by a step,
    while the policy is trained in train mode."""
    from llmctl.config import load_config
    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.finetune_config import FinetuneConfig
    from llmctl.core.train.loop import Trainer

    cfg = load_config(FinetuneConfig, "tiny", ["method=dpo", "adapter.method=full", "max_steps=1", "dropout=0.1"],
                      kind="finetune")
    cfg.model, cfg.data, cfg.objective = str(base), [str(pairs / "pairs.jsonl")], cfg.training_objective
    trainer = Trainer(make_plan(cfg, "cpu"), tmp_path / "run", torch.device("cpu"), distributed.Dist(), {})
    reference = trainer.objective.companions()["reference"]
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    assert not reference.training and trainer.model.training
    trainer.train_step()
    assert all(not p.requires_grad and p.grad is None for p in reference.parameters())
    assert all(torch.equal(v, before[k]) for k, v in reference.state_dict().items())
    assert not reference.training and all(p.requires_grad for p in trainer.model.parameters())


def test_the_recipes_warnings_reach_the_runs_report(corpus, tmp_path):
    from llmctl.core.train.loop import run_training

    report = Recorder()
    assert run_training(_config(corpus, "warmup_steps=3", "lr=0.004"), tmp_path / "run", report=report).exit_code == 0
    assert [m for m in report.messages() if m[0] == "warn"] == [
        ("warn", "warmup_steps=3 is longer than max_steps=1: lr never reaches 0.004")]


def test_force_clears_what_a_killed_force_run_left_in_its_new_folder(corpus, tmp_path):
    """A --force run killed before its first checkpoint leaves `.OUTDIR.new` (a partial checkpoint,
    its records); the next --force run starts that folder over, so none of it reaches OUTDIR."""
    from llmctl.core.train.loop import run_training

    out = tmp_path / "out"
    assert run_training(_config(corpus, "max_steps=2"), out).exit_code == 0
    dead = tmp_path / ".out.new"
    (dead / "checkpoints" / ".step-000001.tmp-99").mkdir(parents=True)
    (dead / "checkpoints" / ".step-000001.tmp-99" / "model.safetensors").write_bytes(b"partial")
    (dead / "notes.txt").write_text("left by the killed run", encoding="utf-8")
    result = run_training(_config(corpus, "max_steps=1", "seed=5"), out, force=True)
    assert result.checkpoint == out / "checkpoints" / "step-000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (out / "notes.txt").exists() and [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]


def test_a_float32_or_bf16_run_on_the_cpu_has_no_loss_scaler_and_warns_nothing(corpus, tmp_path):
    """Loss scaling is for float16 (CUDA) only; a CUDA scaler asked for on the CPU would warn and
    disable itself at every run."""
    import warnings

    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.loop import Trainer

    for precision in ("float32", "bf16"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plan = make_plan(_config(corpus, f"precision={precision}", "warmup_steps=0"), "cpu")
            trainer = Trainer(plan, tmp_path / precision, torch.device("cpu"), distributed.Dist(), {})
        assert trainer.scaler is None


def test_the_tokens_of_a_step_count_every_ranks_micro_batches(corpus, tmp_path, monkeypatch):
    """Rank 0 of two (built in process, the model left unwrapped): a step's tokens are those its
    micro-batches and rank 1's hold, which throughput and MFU are computed from."""
    from llmctl.core.train import distributed, loop
    from llmctl.core.train.build import make_plan

    monkeypatch.setattr(distributed, "wrap", lambda model, *args, **kwargs: model)
    plan = make_plan(_config(corpus, "grad_accum=2", "batch_size=2", "seq_len=16"), "cpu")
    trainer = loop.Trainer(plan, tmp_path / "run", torch.device("cpu"), distributed.Dist(rank=0, world=2), {})
    other = loop.make_data(plan, distributed.Dist(rank=1, world=2))
    read = sum(source.batch(i)[:, 1:].numel() for source in (trainer.data, other) for i in range(2))
    assert trainer.tokens_per_step == read == 2 * 16 * 2 * 2


def test_the_model_is_wrapped_for_the_runs_strategy_device_and_precision(corpus, tmp_path, monkeypatch):
    """What `distributed.wrap` (checked with torchrun in `test_train_distributed.py`) is asked for:
    FSDP computing in bf16 for a bf16 run of two ranks."""
    from llmctl.core.train import distributed, loop
    from llmctl.core.train.build import make_plan

    asked = []
    monkeypatch.setattr(distributed, "wrap", lambda *args: asked.append(args) or args[0])
    plan = make_plan(_config(corpus, "precision=bf16", "distributed.strategy=fsdp"), "cpu")
    d = distributed.Dist(rank=0, world=2)
    trainer = loop.Trainer(plan, tmp_path / "run", torch.device("cpu"), d, {})
    assert asked == [(trainer.model, "fsdp", d, torch.device("cpu"), torch.bfloat16)]


def test_only_the_first_rank_reports(corpus, tmp_path, monkeypatch):
    """keep_sparsity's warning (a model without zeros) comes from rank 0 of two, not from rank 1."""
    from llmctl.core.train import distributed, loop
    from llmctl.core.train.build import make_plan

    monkeypatch.setattr(distributed, "wrap", lambda model, *args, **kwargs: model)
    plan = make_plan(_config(corpus, "keep_sparsity=true"), "cpu")
    said = {}
    for rank in (0, 1):
        report = Recorder()
        loop.Trainer(plan, tmp_path / f"rank{rank}", torch.device("cpu"), distributed.Dist(rank=rank, world=2), {},
                     report=report)
        said[rank] = report.messages()
    assert said == {0: [("warn", "keep_sparsity: the model has no zero weights to keep")], 1: []}
