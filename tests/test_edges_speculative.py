"""Edges of speculative decoding that output-equality tests cannot see (found by mutation testing).

Speculation is lossless whatever the proposer guesses, so a proposer that guesses badly, or a
verifier that ignores the draft's distribution, still gives the target's tokens: only the
proposals, the acceptance rate and the timings show it. These tests look at those directly."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from test_generate import PROMPTS, _ours, ckpts, one_thread, tokdir  # noqa: F401  (fixtures)

from llmctl.core.generate import GenerationConfig
from llmctl.core.generate import speculative as S


@pytest.mark.parametrize("tokens,max_ngram,k,expected", [
    ([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3, 2, [7, 5]),  # the latest earlier occurrence
    ([1, 2, 3, 6, 0, 2, 3, 8, 1, 2, 3], 3, 2, [6, 0]),  # the longest n-gram first, though [2, 3] is later
    ([1, 2, 3, 6, 0, 2, 3, 8, 1, 2, 3], 2, 2, [8, 1]),  # at most max_ngram
    ([5, 6, 5], 2, 3, [6, 5]),  # fewer than k tokens follow
    ([4, 8, 1, 2, 9], 3, 2, []),  # no match
    ([7, 7], 5, 4, [7]),
])
def test_prompt_lookup_proposals(tokens, max_ngram, k, expected):
    assert S.PromptLookupProposer(max_ngram).propose(tokens, None, k) == (expected, None)


def _job(sampling: bool, seed: int = 0):
    return SimpleNamespace(processors=[], sampling=sampling, process=lambda scores, history: scores,
                           generators=[torch.Generator().manual_seed(seed)])


def test_greedy_verification_keeps_drafts_up_to_the_first_mismatch():
    out = torch.full((3, 10), -1.0)
    out[0, 3] = out[1, 4] = out[2, 5] = 1.0  # the target's choices: 3, 4, then 5
    for drafts, expected in [([3, 4], [3, 4, 5]), ([3, 9], [3, 4]), ([7, 4], [3]), ([], [3])]:
        assert S._verify(_job(False), out[: len(drafts) + 1], drafts, None, [0], lambda rows: None) == expected


def test_sampled_verification_keeps_the_targets_distribution():
    g = torch.Generator().manual_seed(1)
    out = torch.randn(2, 4, generator=g) * 2
    q = torch.tensor([[0.1, 0.6, 0.1, 0.2]])
    job, counts, n = _job(True, 2), torch.zeros(4), 4000
    for _ in range(n):
        d = int(torch.multinomial(q[0], 1, generator=g))
        counts[S._verify(job, out, [d], q, [0], lambda rows: None)[0]] += 1
    assert torch.allclose(counts / n, out[0].softmax(-1), atol=0.03)


@pytest.mark.parametrize("temperature", [1.0, 0.7])  # 1.0: no processor at all
def test_the_target_as_its_own_sampling_draft_has_every_draft_accepted(ckpts, one_thread, temperature):  # noqa: F811
    target = ckpts("llama")
    cfg = GenerationConfig(max_new_tokens=10, eos_ids=[], temperature=temperature, seed=3, speculate_k=3)
    result = _ours(target, PROMPTS[:1], cfg, draft=target)[0]
    assert len(result.tokens) == 10 and result.acceptance_rate == 1.0  # q = p: min(1, p/q) = 1


@pytest.mark.parametrize("penalties", [{"repetition_penalty": 1.5, "no_repeat_ngram_size": 2},
                                       {"frequency_penalty": 3.0}])  # counts the generated tokens only
def test_accepted_drafts_reach_the_processors(ckpts, one_thread, penalties):  # noqa: F811
    """The target as its own draft (every draft accepted) with penalties that read the history."""
    target = ckpts("llama")
    cfg = dict(max_new_tokens=12, eos_ids=[], **penalties)
    plain = _ours(target, PROMPTS, GenerationConfig(**cfg))
    spec = _ours(target, PROMPTS, GenerationConfig(**cfg, speculate_k=3), draft=target)
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    assert all(r.acceptance_rate == 1.0 for r in spec)


def test_the_first_token_is_drawn_as_plain_sampling_draws_it(ckpts, one_thread):  # noqa: F811
    target, draft = ckpts("llama"), ckpts("llama", seed=5, num_hidden_layers=1)
    for seed in range(6):
        cfg = {"max_new_tokens": 1, "eos_ids": [], "temperature": 1.0, "seed": seed}
        plain = _ours(target, PROMPTS[:1], GenerationConfig(**cfg))[0].tokens
        assert _ours(target, PROMPTS[:1], GenerationConfig(**cfg), draft=draft)[0].tokens == plain


def test_drafts_never_run_past_max_new_tokens(ckpts, one_thread, monkeypatch):  # noqa: F811
    target = ckpts("llama")
    asked = []
    propose = S.DraftProposer.propose
    monkeypatch.setattr(S.DraftProposer, "propose", lambda self, t, h, k: asked.append(k) or propose(self, t, h, k))
    result = _ours(target, PROMPTS[:1], GenerationConfig(max_new_tokens=4, eos_ids=[], speculate_k=5), draft=target)[0]
    assert len(result.tokens) == 4 and asked == [3]  # one token from the prefill, three to go


def test_prefill_and_decode_times_are_measured_once_each(ckpts, one_thread, monkeypatch):  # noqa: F811
    """A clock that advances by 1 per reading: a prompt's prefill and its decoding take one tick each
    (the target as its own draft: the last accepted draft ends the row)."""
    monkeypatch.setattr(S, "time", SimpleNamespace(perf_counter=itertools.count().__next__))
    target = ckpts("llama")
    results = _ours(target, PROMPTS[:2], GenerationConfig(max_new_tokens=4, eos_ids=[], speculate_k=3), draft=target)
    assert [r.prefill_tokens_per_s for r in results] == [float(r.prompt_tokens) for r in results]
    assert [r.decode_tokens_per_s for r in results] == [4.0, 4.0]


def test_the_draft_runs_with_the_jobs_compile_and_cuda_graph_settings(monkeypatch):
    made = []

    class Runner:
        def __init__(self, *args):
            made.append(args)

        def prefill(self):
            pass

    monkeypatch.setattr(S, "Runner", Runner)
    job = SimpleNamespace(device=torch.device("cpu"), cfg=SimpleNamespace(compile=True, cuda_graph=True))
    S.DraftProposer("draft", job, [1, 2], 10)
    assert made == [("draft", [[1, 2]], 10, job.device, True, True)]


def test_a_draft_with_another_tokenizer_of_the_same_size_is_refused(llmctl, tmp_path, monkeypatch):
    """Same vocabulary size, other ids: the draft's guesses would be other tokens (acceptance 0); refused,
    exit 2, before any weights load. The same vocabulary under another normalizer (another hash) is accepted."""
    import json
    import shutil

    import llmctl.core.model.io as model_io
    from conftest import tiny_llama

    words = "the quick brown fox jumps over a lazy dog while seven wild cats sing loud songs".split()
    texts = [" ".join(words[(i * k) % len(words)] for k in range(1, 12)) for i in range(200)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    target = tiny_llama(tmp_path / "a", texts, vocab=300, context=64)
    other = tiny_llama(tmp_path / "b", [t.upper() for t in texts], vocab=300, context=64)  # same weights
    loaded = []
    real = model_io.load_model
    monkeypatch.setattr(model_io, "load_model", lambda *a, **kw: loaded.append(a[0]) or real(*a, **kw))
    refused = llmctl("generate", target, "the quick", "-n", "3", "--draft", other)
    assert refused.code == 2 and refused.stderr.startswith(f"error: --draft {other}: its tokenizer (")
    assert len(refused.stderr.strip().splitlines()) == 1 and loaded == []
    same = tmp_path / "c"  # the same vocabulary, another hash (a normalizer): ids mean the same tokens
    shutil.copytree(target, same)
    data = json.loads((same / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "NFC"}
    (same / "tokenizer.json").write_text(json.dumps(data))
    accepted = llmctl("generate", target, "the quick", "-n", "3", "--draft", same)
    assert accepted.code == 0 and "tokenizer" not in accepted.stderr
