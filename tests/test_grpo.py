"""GRPO: the loss against TRL's GRPOTrainer._compute_loss, advantages, and finetune runs
(metrics, exact resume, reference choices)."""

import json
import random
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from llmctl.core.rl.grpo import Rollout, advantages, grpo_loss, nanstd

from conftest import tiny_llama

import trl  # noqa: E402


def _trl_trainer(*, beta, loss_type, epsilon, epsilon_high, max_completion_length, logps):
    """A GRPOTrainer with only what `_compute_loss` reads; the policy's log-probs are `logps`."""
    from trl import GRPOTrainer

    t = GRPOTrainer.__new__(GRPOTrainer)
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    t.top_entropy_quantile, t.off_policy_mask_threshold, t.importance_sampling_level = 1.0, None, "token"
    t.beta, t.loss_type, t.epsilon_low, t.epsilon_high = beta, loss_type, epsilon, epsilon_high
    t.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    t.use_vllm, t.aux_loss_enabled, t._entropy_bonus_enabled = False, False, False
    t.model = torch.nn.Linear(1, 1).train()
    t.current_gradient_accumulation_steps, t.max_completion_length = 1, max_completion_length
    t.accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x,
                                    sync_gradients=True)
    t._metrics = defaultdict(lambda: defaultdict(list))
    return t


def _case(seed, B=6, T=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).long()
    logps = -torch.rand(B, T, generator=g) * 3
    old = logps + torch.randn(B, T, generator=g) * 0.3  # off-policy enough to clip
    ref = logps + torch.randn(B, T, generator=g) * 0.2
    adv = torch.randn(B, generator=g)
    return mask, logps, old, ref, adv


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,epsilon_high,old_policy", [(0.0, 0.2, True), (0.04, 0.28, True), (0.1, 0.2, False)])
def test_loss_and_gradient_equal_trl_grpo_trainer(loss_type, beta, epsilon_high, old_policy):
    mask, logps, old, ref, adv = _case(zlib.crc32(f"{loss_type} {beta}".encode()) % 1000)  # hash() of a str varies per process
    B, T = mask.shape
    theirs_logps = logps.clone().requires_grad_()
    trainer = _trl_trainer(beta=beta, loss_type=loss_type, epsilon=0.2, epsilon_high=epsilon_high,
                           max_completion_length=T + 3, logps=theirs_logps)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "num_items_in_batch": mask.sum(), "ref_per_token_logps": ref}
    if old_policy:
        inputs["old_per_token_logps"] = old
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()

    ours_logps = logps.clone().requires_grad_()
    ours, metrics = grpo_loss(ours_logps, old if old_policy else ours_logps.detach(), ref if beta else None, adv,
                              mask, beta=beta, epsilon_low=0.2, epsilon_high=epsilon_high, loss_type=loss_type,
                              max_completion_length=T + 3)
    ours.backward()
    assert abs(ours.item() - theirs.item()) <= 1e-6
    assert torch.allclose(ours_logps.grad, theirs_logps.grad, atol=1e-6, rtol=0)
    assert ours_logps.grad.abs().sum() > 0  # μ=1 (old = detached policy): ratio 1, gradient still flows
    logged = trainer._metrics["train"]
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if beta else ()):
        assert abs(float(metrics[key]) - logged[key][0]) <= 1e-6, key
    if old_policy:
        assert logged["clip_ratio/region_mean"][0] > 0  # the case exercises the clipping


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_follow_trl(scale):
    from trl.trainer.utils import nanstd as trl_nanstd

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, float("nan"), 0.0, 1.0])
    adv, zero = advantages(rewards, 4, scale)
    groups = rewards.view(-1, 4)
    mean = torch.nanmean(groups, 1).repeat_interleave(4)
    std = trl_nanstd(rewards).expand(12) if scale == "batch" else trl_nanstd(groups, dim=1).repeat_interleave(4)
    want = torch.nan_to_num((rewards - mean) / ((std + 1e-4) if scale != "none" else 1), nan=0.0)
    assert torch.allclose(adv, want, atol=1e-6) and torch.allclose(nanstd(rewards), trl_nanstd(rewards))
    assert adv[9] == 0  # unscored: no signal
    assert zero.tolist()[4:8] == ([True] * 4 if scale != "batch" else [False] * 4)
    if scale == "batch":  # the all-reduced form (ranks' counts, sums, squares) of one process is TRL's std
        from llmctl.core.rl.grpo import batch_nanstd
        from llmctl.core.train.distributed import Dist

        torch.testing.assert_close(batch_nanstd(rewards, Dist(), torch.device("cpu")), trl_nanstd(rewards))


def test_rollout_positions_predict_each_completion_token():
    r = Rollout.build([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], ["a", "b"], [False, True], "cpu", pad_id=0)
    assert r.ids.tolist() == [[5, 6, 7, 9, 10], [8, 11, 12, 13, 0]]
    for i in range(2):
        for j in range(int(r.mask[i].sum())):
            assert r.ids[i, r.positions[i, j] + 1] == r.targets[i, j]
    assert r.mask.tolist() == [[1, 1, 0], [1, 1, 1]] and r.truncated.tolist() == [False, True]


# -- finetune --method grpo ------------------------------------------------------------------------

FAST = ["--config", "tiny", "--method", "grpo", "objective_args.num_generations=4",
        "objective_args.max_completion_length=6", "objective_args.verifiers={number: {}}"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    return tiny_llama(out, ["3 + 4 = 7\n12 - 5 = 7\n8 + 1 = 9\n" * 20], vocab=200, context=64, scale=2.0)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    r = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    with path.open("w") as f:
        for _ in range(12):
            a, b = r.randint(0, 9), r.randint(0, 9)
            f.write(json.dumps({"prompt": f"{a} + {b} =", "answer": str(a + b)}) + "\n")
    return path


def digit_share(prompts, completions, answer, **columns):
    """A dense reward for a model that rarely answers right (TRL's reward-function call)."""
    assert len(prompts) == len(completions) == len(answer)
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def _records(out):
    """metrics.jsonl without the timings."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in lines]


def test_grpo_run_writes_trl_metrics_and_resumes_exactly(llmctl, base, prompts, tmp_path):
    args = ["finetune", base, *FAST, "--data", prompts, "adapter=lora", "objective_args.beta=0.05",
            "objective_args.verifiers={number: {}, function: {entry_point: 'test_grpo:digit_share', weight: 0.5}}",
            "objective_args.temperature=1.5", "max_steps=4", "save_every=2"]
    whole = llmctl(*args, "-o", tmp_path / "whole")
    assert whole.code == 0, whole.stderr
    records = _records(tmp_path / "whole")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("reward", "reward_std", "rewards/number/mean", "rewards/function/mean", "kl", "completions/mean_length",
                "completions/clipped_ratio", "clip_ratio/region_mean", "frac_reward_zero_std"):
        assert all(key in r for r in records), key
    assert records[0]["kl"] == 0.0 and records[-1]["kl"] > 0  # the adapter starts as the base, then moves
    assert all(1 <= r["completions/min_length"] <= r["completions/mean_length"] <= r["completions/max_length"] <= 6
               for r in records)
    assert (tmp_path / "whole" / "adapter_config.json").is_file()
    curve = llmctl("--json", "plot", tmp_path / "whole", "--metric", "reward")
    assert curve.code == 0 and [p[1] for p in curve.json()["reward"]] == [r["reward"] for r in records]
    assert llmctl("plot", tmp_path / "whole", "--metric", "rewardz").code == 1

    half = llmctl(*args[:-2], "max_steps=2", "save_every=2", "-o", tmp_path / "cut")
    assert half.code == 0, half.stderr
    resumed = llmctl(*args, "--resume", "-o", tmp_path / "cut")
    assert resumed.code == 0, resumed.stderr
    assert _records(tmp_path / "cut") == records
    assert (tmp_path / "cut" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "adapter_model.safetensors").read_bytes()


def test_reference_log_probs_adapter_off_equal_a_frozen_base_and_beta_zero_needs_none(base, prompts, tmp_path):
    from llmctl.core.adapters import adapters_disabled
    from llmctl.core.model.io import load_model, save_model
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.finetune_config import FinetuneConfig
    from llmctl.core.train.objectives import OBJECTIVES

    def objective(method, beta, model=base):
        cfg = FinetuneConfig(model=str(model), tokenizer=str(base), data=[str(prompts)], method="grpo",
                             objective="grpo", seq_len=64,
                             objective_args={"beta": beta, "temperature": 0.7, "verifiers": {"number": {}}})
        cfg.adapter.method = method
        return OBJECTIVES.get("grpo")(make_plan(cfg, "cpu"), torch.device("cpu"))

    assert objective("full", 0.0).companions() == {}
    full = objective("full", 0.1)
    assert set(full.companions()) == {"reference"}
    lora = objective("lora", 0.1)
    assert lora.companions() == {}  # the adapter switched off is the reference: no second copy
    model = load_model(base)[0]
    lora.prepare(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # an adapter that changes the outputs
    rollout = Rollout.build([[0, 5, 6], [0, 7]], [[8, 9, 1], [10]], ["", ""], [False, False], "cpu", pad_id=2)
    with torch.no_grad():
        adapted = lora.logprobs(model, model.head, rollout)
        with adapters_disabled(model):
            switched_off = lora.logprobs(model, model.head, rollout)
        frozen = full.logprobs(full.reference, full.reference.head, rollout)
        assert torch.equal(full._reference(rollout), frozen) and torch.equal(lora._reference(rollout), switched_off)
    assert torch.allclose(switched_off, frozen, atol=1e-6) and not torch.allclose(adapted, frozen, atol=1e-3)
    assert objective("lora", 0.0)._reference(rollout) is None
    bf16 = save_model(load_model(base, dtype=torch.bfloat16)[0], tmp_path / "bf16")  # the frozen copy in float32
    assert {p.dtype for p in objective("full", 0.1, bf16).reference.parameters()} == {torch.float32}
    with torch.no_grad():  # log-probs at the sampling temperature, as TRL takes them
        logits = full.reference(rollout.ids).logits / 0.7
    manual = torch.log_softmax(logits[:, :-1], -1).gather(-1, rollout.ids[:, 1:, None])[..., 0]
    assert torch.allclose(frozen[0], manual[0, 2:5], atol=1e-5) and torch.allclose(frozen[1, :1], manual[1, 1:2])


def test_grpo_config_errors_are_one_line_usage_errors(llmctl, base, prompts, tmp_path):
    for bad, message in [("objective_args.num_generations=1", "num_generations must be >= 2"),
                         ("objective_args.num_iterations=0", "num_iterations must be >= 1"),
                         ("objective_args.verifiers={nunber: {}}", "did you mean 'number'"),
                         ("objective_args.verifiers={regex: {patern: x}}", "unknown setting(s) patern"),
                         ("objective_args.loss_type=ppo", "objective_args.loss_type")]:
        r = llmctl("finetune", base, *FAST, "--data", prompts, bad, "-o", tmp_path / "out")
        assert r.code == 2 and message in r.stderr, (bad, r.stderr)
        assert not (tmp_path / "out").exists()
    no_prompt = tmp_path / "bad.jsonl"
    no_prompt.write_text('{"prompt": "1 + 1 =", "answer": "2"}\n{"question": "x"}\n')
    r = llmctl("finetune", base, *FAST, "--data", no_prompt, "-o", tmp_path / "out")
    assert r.code == 1 and f"{no_prompt}:2: an RL record needs a 'prompt'" in r.stderr


def test_a_reward_model_is_a_parent_of_the_run(base, prompts, tmp_path):
    """The reward model a run is trained against is in its lineage's parents, and so among the
    inputs `--force` never replaces (the trainer protects every parent of its plan)."""
    import shutil

    import transformers

    from llmctl.core.train.build import make_plan
    from llmctl.core.train.finetune_config import FinetuneConfig

    config = transformers.AutoConfig.from_pretrained(base)
    config.num_labels, config.pad_token_id = 1, 2
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, tmp_path / "rm" / name)
    cfg = FinetuneConfig(model=str(base), data=[str(prompts)], method="grpo", objective="grpo", seq_len=64,
                         objective_args={"verifiers": {"number": {}, "reward_model": {"path": str(tmp_path / "rm")}}})
    assert make_plan(cfg, "cpu").parents == [str(base), str(tmp_path / "rm")]
