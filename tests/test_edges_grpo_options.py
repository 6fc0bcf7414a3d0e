"""Each GRPO option that changes the math reaches it from `objective_args`: the sampling options
reach the rollout's GenerationConfig, the clipping/loss options `grpo_loss`, and the reward
scaling and truncation mask the round's advantages and masks (an option dropped on the way would
pass the TRL-parity tests of the functions themselves)."""

from types import SimpleNamespace

import pytest
import torch

from llmctl.core.rl import grpo as G


def _objective(**objective_args) -> G.GRPO:
    obj = object.__new__(G.GRPO)
    obj.settings = G.settings(SimpleNamespace(config=SimpleNamespace(objective_args=objective_args)))
    obj.record = lambda **metrics: None
    return obj


def test_sampling_options_reach_the_rollouts_generation(monkeypatch):
    import llmctl.core.generate as generation

    class Sampled(Exception):
        pass

    seen = []
    def generate(model, tok, prompts, gen):
        seen.append(gen)
        raise Sampled  # the options are all this test needs

    monkeypatch.setattr(generation, "generate", generate)
    obj = _objective(temperature=0.7, top_p=0.9, top_k=5, stop=["\n"], max_completion_length=11)
    obj.plan, obj.cfg, obj.policy = SimpleNamespace(tokenizer=None), SimpleNamespace(seed=3), torch.nn.Linear(1, 1)
    with pytest.raises(Sampled):
        obj.rollout(["a", "b"], 2)
    gen = seen[0]
    assert (gen.temperature, gen.top_p, gen.top_k, gen.stop, gen.max_new_tokens) == (0.7, 0.9, 5, ["\n"], 11)


def _step_inputs(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g) * 3
    old = logps + (torch.rand(B, T, generator=g) - 0.5)  # ratios well outside 1 ± 0.05
    ref = logps + (torch.rand(B, T, generator=g) - 0.5)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    mask = (torch.arange(T) < torch.tensor([6, 3, 5, 2])[:, None]).float()
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("args", [{"epsilon": 0.05}, {"epsilon": 0.05, "epsilon_high": 0.3}, {"loss_type": "grpo"},
                                  {"loss_type": "bnpo"}, {"loss_type": "dr_grpo", "max_completion_length": 40},
                                  {"beta": 0.2}])
def test_loss_options_reach_grpo_loss(args):
    logps, old, ref, adv, mask = _step_inputs()

    def loss_of(**a):
        obj = _objective(**a)
        obj.cfg, obj.policy = SimpleNamespace(grad_accum=1), SimpleNamespace(head=None)
        obj.round = SimpleNamespace(parts=[SimpleNamespace(rollout=None, old=old, ref=ref, advantages=adv, mask=mask)],
                                    num_items=30.0)  # dapo's normaliser (the step's tokens), not bnpo's
        obj.logprobs = lambda forward, head, rollout: logps
        return obj.loss(None, None, None, {"index": 0})[0]

    s = G.GRPOConfig(**args)
    expected = G.grpo_loss(logps, old, ref, adv, mask, beta=s.beta, epsilon_low=s.epsilon,
                           epsilon_high=s.epsilon if s.epsilon_high is None else s.epsilon_high, loss_type=s.loss_type,
                           max_completion_length=s.max_completion_length, num_items=30.0)[0]
    assert torch.allclose(loss_of(**args), expected)
    assert not torch.allclose(loss_of(), expected)


@pytest.mark.parametrize("args", [{"scale_rewards": "batch"}, {"scale_rewards": "none"},
                                  {"mask_truncated_completions": True}, {"num_generations": 2}])
def test_round_options_reach_advantages_and_masks(args):
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0, 0.5])
    truncated = [False, True, False, False, True, False, False, False]

    def round_of(**a):
        obj = _objective(**{"num_generations": 4, **a})
        obj.records = [{"prompt": "p"}] * 8
        obj.dist, obj.device = SimpleNamespace(enabled=False, world=1), torch.device("cpu")
        completions = [[5] * (1 + i % 3) for i in range(8)]
        obj.rollout = lambda prompts, number: G.Rollout.build([[1, 2]] * len(prompts), completions[:len(prompts)],
                                                              ["x"] * len(prompts), truncated[:len(prompts)], "cpu", 0)
        obj.rewards = lambda rollout, records: (rewards[:len(records)], {})
        groups = obj.settings.num_generations
        return obj.generate([torch.arange(8 // groups)], 0), groups

    new_round, groups = round_of(**args)
    (part,) = new_round.parts
    s = G.GRPOConfig(**{"num_generations": 4, **args})
    assert torch.allclose(part.advantages, G.advantages(rewards, groups, s.scale_rewards)[0])
    rollout_mask = part.rollout.mask
    expected_mask = rollout_mask * ~torch.tensor(truncated)[:, None] if s.mask_truncated_completions else rollout_mask
    assert torch.equal(part.mask, expected_mask)
    default, _ = round_of()
    assert not (torch.allclose(default.parts[0].advantages, part.advantages) and torch.equal(default.parts[0].mask, part.mask))
