"""GRPO's maths at its edges, against TRL (GRPOTrainer's reward scaling and `_compute_loss`,
`trl.trainer.utils.nanstd`): groups of one and two, a batch of one reward, a given batch std,
completions of one token and none, ratios exactly on the clipping bounds; and the round's
tensors (`Rollout.build`/`split`, `Round.state`) by hand."""

from types import SimpleNamespace

import pytest
import torch

from llmctl.core.rl import grpo as G
from llmctl.core.rl.grpo import (
    GRPO,
    Part,
    Rollout,
    Round,
    advantages,
    batch_nanstd,
    grpo_loss,
    nanstd,
)
from llmctl.core.train.distributed import Dist
from llmctl.errors import ConfigError

import trl  # noqa: E402

from test_grpo import _trl_trainer


def _trl_advantages(rewards, G, scale):
    """GRPOTrainer._generate_and_score_completions' scaling ("sum_then_normalize"), transcribed."""
    from trl.trainer.utils import nanstd as trl_nanstd

    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    if scale == "batch":
        std = trl_nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = trl_nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G) if G > 1 else torch.zeros_like(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), torch.isclose(std, torch.zeros_like(std))


def test_nanstd_is_trls_in_shape_and_dtype():
    from trl.trainer.utils import nanstd as trl_nanstd

    x = torch.tensor([[1.0, float("nan"), 3.0, 0.5], [2.0, 2.0, float("nan"), 7.0]], dtype=torch.float64)
    torch.testing.assert_close(nanstd(x), trl_nanstd(x))  # a 0-d tensor
    torch.testing.assert_close(nanstd(x, dim=1), trl_nanstd(x, dim=1))
    torch.testing.assert_close(nanstd(x, dim=0), trl_nanstd(x, dim=0), equal_nan=True)  # a column of one: NaN


@pytest.mark.parametrize("G,scale", [(1, "group"), (2, "group"), (2, "none"), (1, "batch"), (2, "batch"), (3, "batch")])
def test_advantages_of_small_groups_and_batches_are_trls(G, scale):
    rewards = torch.tensor([0.0, 1.0, 0.25, 0.25, 3.0, float("nan")])[: G * (3 if G < 3 else 2)]
    for r in (rewards, rewards[:G]):  # the whole batch, and one group alone
        adv, zero = advantages(r, G, scale)
        want_adv, want_zero = _trl_advantages(r, G, scale)
        torch.testing.assert_close(adv, want_adv)
        assert zero.tolist() == want_zero.tolist()


def test_a_given_batch_std_is_the_one_divided_by():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    adv, zero = advantages(rewards, 3, "batch", batch_std=torch.tensor(2.0))
    mean = torch.tensor([1 / 3] * 3 + [2 / 3] * 3)
    torch.testing.assert_close(adv, (rewards - mean) / (2.0 + 1e-4))
    assert not zero.any()
    adv, _ = advantages(rewards, 3, "group", batch_std=torch.tensor(2.0))  # only "batch" reads it
    torch.testing.assert_close(adv, _trl_advantages(rewards, 3, "group")[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_nanstd_from_sums_is_trls_and_zero_below_two_rewards(dtype):
    from trl.trainer.utils import nanstd as trl_nanstd

    cpu = torch.device("cpu")
    for rewards in ([1.0, float("nan"), 4.0], [0.5, 2.0, 2.0, float("nan"), -1.0]):
        r = torch.tensor(rewards, dtype=dtype)
        torch.testing.assert_close(batch_nanstd(r, Dist(), cpu), trl_nanstd(r))
    for rewards in ([3.0], [float("nan"), 3.0], [float("nan")]):  # TRL's std is NaN there; the advantages agree
        std = batch_nanstd(torch.tensor(rewards, dtype=dtype), Dist(), cpu)
        assert std.dtype == dtype and std.item() == 0.0


def _trl_loss(logps, old, ref, adv, mask, *, beta, eps_low, eps_high, loss_type, num_items):
    t = _trl_trainer(beta=beta, loss_type=loss_type, epsilon=eps_low, epsilon_high=eps_high,
                     max_completion_length=mask.shape[1] + 2, logps=logps)
    B, T = mask.shape
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "num_items_in_batch": torch.tensor(num_items), "ref_per_token_logps": ref,
              "old_per_token_logps": old}
    return t._compute_loss(t.model, inputs).item(), {k: v[0] for k, v in t._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("lengths", [[1, 0, 0], [1, 3, 0], [0, 0, 0]])
def test_loss_of_one_token_and_empty_completions_is_trls(loss_type, lengths):
    g = torch.Generator().manual_seed(len(loss_type) + sum(lengths))
    mask = (torch.arange(4) < torch.tensor(lengths)[:, None]).long()
    logps = -torch.rand(3, 4, generator=g) * 2
    old, ref = logps + torch.randn(3, 4, generator=g) * 0.4, logps + torch.randn(3, 4, generator=g) * 0.2
    adv = torch.tensor([1.0, -0.5, 2.0])
    num_items = float(mask.sum()) if loss_type != "dapo" else 1.0  # dapo: a step's count below this batch's
    theirs, logged = _trl_loss(logps, old, ref, adv, mask, beta=0.05, eps_low=0.2, eps_high=0.2,
                               loss_type=loss_type, num_items=num_items)
    ours, metrics = grpo_loss(logps, old, ref, adv, mask, beta=0.05, epsilon_low=0.2, epsilon_high=0.2,
                              loss_type=loss_type, max_completion_length=6,
                              num_items=num_items if loss_type == "dapo" else None)
    assert abs(ours.item() - theirs) <= 1e-6
    for key in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert abs(float(metrics[key]) - logged[key]) <= 1e-6, key


def test_a_ratio_on_the_clipping_bound_is_not_counted_as_clipped():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]])
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 2, dtype=torch.long)
    _, logged = _trl_loss(logps, logps, logps, adv, mask, beta=0.0, eps_low=0.0, eps_high=0.0, loss_type="bnpo",
                          num_items=4.0)  # epsilon 0 (allowed): ratio 1 is on both bounds
    _, metrics = grpo_loss(logps, logps, None, adv, mask, beta=0.0, epsilon_low=0.0, epsilon_high=0.0,
                           loss_type="bnpo", max_completion_length=2)
    assert float(metrics["clip_ratio/region_mean"]) == logged["clip_ratio/region_mean"] == 0.0
    assert float(metrics["clip_ratio/low_mean"]) == float(metrics["clip_ratio/high_mean"]) == 0.0


def test_an_unknown_loss_type_is_a_one_line_config_error_naming_the_choices():
    x = torch.zeros(1, 2)
    with pytest.raises(ConfigError, match=r"^objective_args\.loss_type: 'ppo'; choose from grpo, bnpo, dr_grpo, dapo$"):
        grpo_loss(x, x, None, torch.zeros(1), torch.ones(1, 2), beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
                  loss_type="ppo", max_completion_length=2)


def test_rollout_rows_and_their_split_by_hand():
    prompts, completions = [[5, 6, 7], [8], [9, 10], [11, 12]], [[1, 2], [3], [4], [6]]
    r = Rollout.build(prompts, completions, ["ab", "c", "d", "e"], [True, False, False, True], "cpu", pad_id=0)
    assert r.ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 0, 0, 0], [9, 10, 4, 0, 0], [11, 12, 6, 0, 0]]
    assert r.ids.dtype == r.targets.dtype == torch.long
    assert r.targets.tolist() == [[1, 2], [3, 0], [4, 0], [6, 0]]
    assert r.positions.tolist() == [[2, 3], [0, 1], [1, 2], [1, 2]]  # row 0's last input predicts its last token
    assert r.mask.tolist() == [[1, 1], [1, 0], [1, 0], [1, 0]] and r.truncated.tolist() == [True, False, False, True]
    first, second = r.split(2)  # each cut to its own longest completion (not the part's token count)
    assert (first.ids.tolist(), first.positions.tolist(), first.targets.tolist()) == (
        [[5, 6, 7, 1], [8, 3, 0, 0]], [[2, 3], [0, 1]], [[1, 2], [3, 0]])
    assert (second.ids.tolist(), second.positions.tolist(), second.mask.tolist()) == (
        [[9, 10], [11, 12]], [[1], [1]], [[1], [1]])
    assert second.texts == ["d", "e"] and second.truncated.tolist() == [False, True]
    ragged = Rollout.build([[5, 6, 7, 8], [9]], [[1], [2, 3, 4]], ["", ""], [False, False], "cpu", pad_id=0)
    assert ragged.positions.tolist() == [[3, 4, 4], [0, 1, 2]]  # past the row's end: its last input (masked)
    empty = Rollout.build([[4, 5]], [[]], [""], [False], "cpu", pad_id=0)  # nothing sampled: one masked column
    assert empty.targets.shape == (1, 1) and empty.positions.tolist() == [[1]] and empty.mask.sum() == 0
    assert empty.split(1)[0].mask.shape == (1, 1)


def test_round_state_round_trips_every_tensor_and_dapos_count():
    r = Rollout.build([[5, 6], [7]], [[1, 2], [3]], ["", ""], [False, True], "cpu", pad_id=0)
    ref, old = -torch.rand(2, 2), -torch.rand(2, 2)
    parts = [Part(r, torch.tensor([0.5, -0.5]), r.mask * torch.tensor([[1.0], [0.0]]), ref, old),
             Part(r, torch.tensor([1.0, -1.0]), r.mask, None, None)]
    for num_items in (10 / 3, None):  # dapo's count kept to float64: a resumed step divides by the same
        back = Round.from_state(Round(7, parts, num_items).state(), "cpu")
        assert (back.number, back.num_items, len(back.parts)) == (7, num_items, 2)
        for ours, theirs in zip(back.parts, parts):
            for name in ("advantages", "mask", "ref", "old"):
                a, b = getattr(ours, name), getattr(theirs, name)
                assert (a is None and b is None) or torch.equal(a, b), name
            for name in ("ids", "positions", "targets", "mask", "truncated"):
                assert torch.equal(getattr(ours.rollout, name), getattr(theirs.rollout, name)), name


def test_rewards_are_trls_weighted_nansum_and_nan_where_no_verifier_scored():
    from llmctl.core.rl.verifiers import Bound, Verdict

    class Fixed:
        def __init__(self, values):
            self.values = values

        def verify(self, prompts, completions, records):
            return [Verdict(v, "fixed") for v in self.values]

    nan = float("nan")
    table = torch.tensor([[1.0, 0.0], [nan, 1.0], [nan, nan], [0.0, 0.5]])
    obj = object.__new__(GRPO)
    obj.verifiers = [Bound("a", 2.0, Fixed(table[:, 0].tolist())), Bound("b", 0.5, Fixed(table[:, 1].tolist()))]
    total, each = obj.rewards(SimpleNamespace(texts=[""] * 4), [{"prompt": "p"}] * 4)
    want = (table * torch.tensor([2.0, 0.5])).nansum(dim=1)  # TRL's sum_then_normalize
    want[torch.isnan(table).all(dim=1)] = nan
    torch.testing.assert_close(total, want, equal_nan=True)
    torch.testing.assert_close(each["b"], table[:, 1], equal_nan=True)


def _resolve(**objective_args):
    adapter = objective_args.pop("adapter_method", "lora")
    config = SimpleNamespace(objective_args=objective_args, adapter_method=adapter,
                             chat_template=objective_args.pop("chat_template", "{{ x }}"))
    with pytest.raises(ConfigError) as e:
        GRPO.resolve(SimpleNamespace(config=config, init_from=None))
    return str(e.value)


def test_settings_are_refused_exactly_past_their_bounds():
    chat = "config key 'chat_template': grpo renders chat prompts with the tokenizer's template"
    # on the bounds: accepted, so the next check (a chat template) is the one that speaks
    assert _resolve(num_generations=2, max_completion_length=1, temperature=1e-6, epsilon=0.0, epsilon_high=0.0,
                    beta=0.0, num_iterations=1) == chat
    assert _resolve(epsilon=0.0, epsilon_high=0.5) == chat
    for bad, message in [({"num_generations": 1}, "num_generations must be >= 2 (advantages compare a group)"),
                         ({"max_completion_length": 0}, "max_completion_length must be >= 1"),
                         ({"temperature": 0.0}, "temperature must be > 0 (GRPO samples)"),
                         ({"epsilon": -0.1, "epsilon_high": 0.2}, "epsilon must be >= 0"),
                         ({"epsilon_high": -0.1}, "epsilon must be >= 0"),
                         ({"beta": -0.5}, "beta must be >= 0"),
                         ({"num_iterations": 0}, "num_iterations must be >= 1")]:
        assert _resolve(**bad) == f"objective_args.{message}", bad
    full = "objective_args.beta > 0 with full finetuning needs a base checkpoint as the reference"
    assert _resolve(beta=0.1, adapter_method="full", chat_template=None) == full
    # lora: the adapter switched off is the reference, so beta passes and the verifiers speak
    unknown = _resolve(beta=0.1, chat_template=None, verifiers={"regex": {"patern": "x"}})
    assert "patern" in unknown and unknown != full


def test_the_training_state_holds_the_round_only_when_later_steps_reuse_it():
    r = Rollout.build([[5]], [[1]], [""], [False], "cpu", pad_id=0)
    obj = object.__new__(GRPO)
    obj.round = Round(3, [Part(r, torch.tensor([1.0]), r.mask, None, None)], None)
    for iterations, kept in ((1, False), (2, True)):
        obj.settings = SimpleNamespace(num_iterations=iterations)
        assert (obj.state() == {}) is not kept
    assert int(obj.state()["number"]) == 3
    obj.round = None
    assert obj.state() == {}


@pytest.mark.parametrize("pad_id,eos_id,pad", [(3, 7, 3), (None, 7, 7), (None, None, 0)])
def test_a_rollout_marks_completions_cut_at_the_length_and_pads_with_pad_else_eos(monkeypatch, pad_id, eos_id, pad):
    import llmctl.core.generate as generation

    seen = []

    def generate(model, tok, prompts, gen):
        seen.append(gen)
        return [SimpleNamespace(tokens=[9] * (1 + i), text="x", finish_reason=reason)
                for i, reason in enumerate(["length", "stop", "eos"])]

    monkeypatch.setattr(generation, "generate", generate)
    obj = object.__new__(GRPO)
    obj.settings = G.settings(SimpleNamespace(config=SimpleNamespace(objective_args={})))
    obj.plan = SimpleNamespace(tokenizer=SimpleNamespace(pad_id=pad_id, eos_id=eos_id, encode=lambda p, **k: [1, 2]))
    obj.cfg, obj.policy, obj.device = SimpleNamespace(seed=3), torch.nn.Linear(1, 1), torch.device("cpu")
    r = obj.rollout(["a", "b", "c"], 0)
    assert r.truncated.tolist() == [True, False, False]
    assert r.ids[0].tolist() == [1, 2, 9, pad, pad] and r.targets[0].tolist() == [9, pad, pad]
    assert seen[0].batch_size == 3  # the round's completions in one batch


def test_encode_reads_the_prompt_records_and_says_what_a_step_samples(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1 + 1 =", "answer": "2"}\n{"prompt": "2 + 2 =", "answer": "4"}\n')
    said = []
    plan = SimpleNamespace(text_files=[path], report=SimpleNamespace(info=said.append),
                           config=SimpleNamespace(objective_args={"num_generations": 4}, batch_size=2))
    assert [r["prompt"] for r in GRPO.encode(plan)["records"]] == ["1 + 1 =", "2 + 2 ="]
    assert said == ["GRPO data: 2 prompts, 4 completions each, 2 prompts per micro-batch"]


@pytest.mark.parametrize("isolated", [True, False])
def test_a_verifier_warning_reaches_the_report_before_training(monkeypatch, isolated):
    """`unit_tests` warns when the sandbox cannot cut programs off the network; other verifiers have nothing to say."""
    from llmctl.core import sandbox
    from llmctl.core.train.sft import SFT

    monkeypatch.setattr(sandbox, "network_isolated", lambda: isolated)
    monkeypatch.setattr(SFT, "resolve", classmethod(lambda cls, plan: None))  # GRPO's own checks only
    warned = []
    config = SimpleNamespace(objective_args={"verifiers": {"number": {}, "unit_tests": {"timeout": 2}}},
                             adapter_method="lora", chat_template=None)
    GRPO.resolve(SimpleNamespace(config=config, init_from=None, report=SimpleNamespace(warn=warned.append)))
    assert warned == ([] if isolated else [f"verifier unit_tests: {sandbox.NOT_ISOLATED}"])
