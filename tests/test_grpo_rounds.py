"""GRPO generation rounds: `num_iterations` μ > 1 (old log-probs from sampling time, TRL's loss,
exact resume between a round's updates) and dapo's normaliser over the whole step (gradient
accumulation and DDP equal one process with the doubled batch)."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import trl  # noqa: E402

from test_grpo import FAST, _records, _trl_trainer, base, prompts  # noqa: E402,F401  (fixtures)

from llmctl.core.rl.grpo import GRPO, Rollout  # noqa: E402

DIGITS = "objective_args.verifiers={function: {entry_point: 'grpo_rewards:digit_share'}}"  # a dense reward


def _trainer(base, prompts, tmp_path, *overrides):
    """An in-process GRPO Trainer with a LoRA adapter."""
    from llmctl.config import load_config
    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.finetune_config import FinetuneConfig
    from llmctl.core.train.loop import Trainer

    cfg = load_config(FinetuneConfig, "tiny", [f"model={base}", f"data={prompts}", "method=grpo", "dropout=0",
                                               *FAST[4:], *overrides], kind="finetune")
    cfg.objective, cfg.adapter.method = "grpo", "lora"
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    return Trainer(make_plan(cfg, "cpu"), out, torch.device("cpu"), distributed.Dist(), {})


def fixed_rollout(self, prompts, index):
    """Completions that depend only on (prompt, place in its group, round), not on the batch, the
    process or the policy: so runs that split a batch differently sample the same."""
    from llmctl.core.generate import encode_prompt

    tok, s = self.plan.tokenizer, self.settings
    completions = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(zlib.crc32(f"{prompt}|{i % s.num_generations}|{index}".encode()))
        n = int(torch.randint(1, s.max_completion_length + 1, (), generator=g))
        completions.append(torch.randint(3, self.plan.model_config.vocab_size, (n,), generator=g).tolist())
    return Rollout.build([encode_prompt(tok, p) for p in prompts], completions, [tok.decode(c) for c in completions],
                         [len(c) == s.max_completion_length for c in completions], self.device, pad_id=2)


def test_second_update_of_a_round_is_trls_loss_with_old_log_probs_and_clips(base, prompts, tmp_path):  # noqa: F811
    trainer = _trainer(base, prompts, tmp_path, "objective_args.num_iterations=2", "objective_args.beta=0.04",
                       "objective_args.epsilon=0.02", "objective_args.temperature=1.5", DIGITS, "lr=0.05")
    objective = trainer.objective
    trainer.train_step()  # round 0, first update: sampled by these very weights, so the ratio is 1
    first = objective.recorded_metrics()
    assert first["clip_ratio/region_mean"] == 0 and "reward" in first
    part = objective.round.parts[0]
    assert objective.round.number == 0 and part.old is not None and part.ref is not None

    index = 1 * trainer.cfg.grad_accum  # step 1: round 0 again, its second update
    inputs, labels, extra = trainer._inputs(trainer.data.batch(index), index)
    objective.step_batches([(inputs, labels, extra)])
    assert objective.round.number == 0  # reused, not sampled again
    ours, _ = objective.loss(trainer.forward, inputs, labels, extra)
    metrics = objective.recorded_metrics()
    assert "reward" not in metrics  # no new generation
    with torch.no_grad():
        logps = objective.logprobs(trainer.model, trainer.model.head, part.rollout)
    assert ((logps - part.old).abs() * part.mask).max() > 1e-3  # the policy moved since sampling: ratio ≠ 1

    B, T = part.mask.shape
    s = objective.settings
    theirs = _trl_trainer(beta=s.beta, loss_type=s.loss_type, epsilon=s.epsilon, epsilon_high=s.epsilon,
                          max_completion_length=s.max_completion_length, logps=logps)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": part.mask,
              "advantages": part.advantages, "old_per_token_logps": part.old, "ref_per_token_logps": part.ref,
              "num_items_in_batch": part.mask.sum()}
    expected = theirs._compute_loss(theirs.model, inputs)
    assert abs(ours.item() - expected.item()) <= 1e-6
    clipped = theirs._metrics["train"]["clip_ratio/region_mean"][0]
    assert metrics["clip_ratio/region_mean"] == pytest.approx(clipped, abs=1e-6) and clipped > 0  # clipping bites


def test_num_iterations_run_trains_and_resumes_exactly_between_updates(llmctl, base, prompts, tmp_path):  # noqa: F811
    args = ["finetune", base, *FAST, "--data", prompts, "adapter=lora", "objective_args.num_iterations=2",
            "objective_args.temperature=1.5", "objective_args.epsilon=0.05", DIGITS, "lr=0.02"]
    whole = llmctl(*args, "max_steps=4", "save_every=0", "-o", tmp_path / "whole")
    assert whole.code == 0, whole.stderr
    records = _records(tmp_path / "whole")
    assert [("reward" in r) for r in records] == [True, False, True, False]  # a round every two steps
    assert max(r["clip_ratio/region_mean"] for r in records[1::2]) > 0
    cut = llmctl(*args, "max_steps=3", "save_every=3", "-o", tmp_path / "cut")  # stops inside round 1
    assert cut.code == 0, cut.stderr
    from safetensors import safe_open

    state = safe_open(tmp_path / "cut/checkpoints/step-000003/trainer_state/state.safetensors", "pt").keys()
    assert {"objective.0.number", "objective.0.0.old", "objective.0.0.ids"} <= set(state)
    resumed = llmctl(*args, "max_steps=4", "save_every=0", "--resume", "-o", tmp_path / "cut")
    assert resumed.code == 0, resumed.stderr
    assert _records(tmp_path / "cut") == records
    assert (tmp_path / "cut" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "adapter_model.safetensors").read_bytes()


def _params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}


def test_dapo_with_grad_accum_equals_the_doubled_batch(base, prompts, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(GRPO, "rollout", fixed_rollout)  # completions of many lengths (the tiny model's fill them all)
    common = ("objective_args.loss_type=dapo", DIGITS, "lr=0.02")
    whole = _trainer(base, prompts, tmp_path, *common, "batch_size=4", "grad_accum=1")
    accum = _trainer(base, prompts, tmp_path, *common, "batch_size=2", "grad_accum=2")
    for _ in range(2):
        a, b = whole.train_step(), accum.train_step()
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
        counts = [float(p.mask.sum()) for p in accum.objective.round.parts]
        assert counts[0] != counts[1]  # micro-batches of unequal lengths: a per-micro-batch mean would differ
        assert accum.objective.round.num_items == sum(counts) / 2
    for name, value in _params(whole).items():
        torch.testing.assert_close(_params(accum)[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_dapo_under_ddp_and_fsdp_equals_one_process_with_the_global_batch(base, prompts, tmp_path, monkeypatch):  # noqa: F811
    """Two ranks × 2 prompts against one process × 4, with μ = 2: the DDP run stops inside a
    round and resumes from every rank's saved round, under FSDP (a checkpoint is unsharded).
    Rewards are scaled by the std of the whole batch, every rank's (`scale_rewards=batch`)."""
    from test_train import curve
    from test_train_distributed import _free_port, assert_close

    from llmctl.cli import main

    args = [base, *FAST, "--data", prompts, "adapter=lora", "objective_args.loss_type=dapo", DIGITS, "lr=0.05",
            "objective_args.num_iterations=2", "objective_args.epsilon=0.05", "objective_args.scale_rewards=batch"]
    monkeypatch.setattr(GRPO, "rollout", fixed_rollout)
    assert main(["--quiet", "finetune", *map(str, args), "batch_size=4", "max_steps=4", "save_every=0",
                 "-o", str(tmp_path / "single")]) == 0
    here = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get(
        "PYTHONPATH")]))}

    def torchrun(*more):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={_free_port()}", "-m", "test_grpo_rounds", "--quiet", "finetune",
                            *map(str, args), "batch_size=2", *more, "-o", str(tmp_path / "ddp")],
                           env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]

    torchrun("max_steps=3", "save_every=3")
    from safetensors import safe_open

    state = safe_open(tmp_path / "ddp/checkpoints/step-000003/trainer_state/state.safetensors", "pt").keys()
    assert {"objective.0.0.old", "objective.1.0.old"} <= set(state)  # each rank's round
    torchrun("max_steps=4", "save_every=0", "distributed.strategy=fsdp", "--resume")
    assert_close(curve(tmp_path / "ddp"), curve(tmp_path / "single"))
    from safetensors.torch import load_file

    ours, reference = load_file(tmp_path / "ddp/adapter_model.safetensors"), \
        load_file(tmp_path / "single/adapter_model.safetensors")
    for key, tensor in reference.items():
        assert torch.allclose(ours[key], tensor, rtol=1e-4, atol=1e-5), key


def test_an_fsdp_sharded_policy_samples_and_scores_as_the_plain_one(base, prompts, tmp_path):  # noqa: F811
    """FSDP (one gloo process here): sampling gathers the whole policy, the head run apart from the
    wrapped forward gathers its shard; completions and log-probs equal the unsharded model's."""
    import torch.distributed as dist

    from test_train_distributed import _free_port

    from llmctl.core.train import distributed

    trainer = _trainer(base, prompts, tmp_path, DIGITS, "objective_args.temperature=1.5")
    objective, model = trainer.objective, trainer.model
    texts = [objective.records[i]["prompt"] for i in range(3) for _ in range(4)]
    plain = objective.rollout(texts, 7)
    with torch.no_grad():
        plain_logps = objective.logprobs(model, model.head, plain)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        distributed.wrap(model, "fsdp", distributed.Dist(world=2), torch.device("cpu"))  # shards over the group
        assert type(model.lm_head.weight).__name__ == "DTensor"
        sharded = objective.rollout(texts, 7)
        with torch.no_grad():
            sharded_logps = objective.logprobs(model, model.head, sharded)
    finally:
        dist.destroy_process_group()
    assert sharded.texts == plain.texts and torch.equal(sharded.ids, plain.ids)
    assert torch.allclose(sharded_logps, plain_logps, atol=1e-6)


if __name__ == "__main__":  # each torchrun process: llmctl with the batch-independent completions
    from llmctl.cli import main

    GRPO.rollout = fixed_rollout
    sys.exit(main(sys.argv[1:]))
