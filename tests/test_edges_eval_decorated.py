"""Edges of the decorated scorers that mutmut 3 never mutated before `scripts/undecorate.py`: TruthfulQA's
mc2 (a registered metric), the causal scoring model's `features`, `score_rows` and `_score_shared`
(under `torch.inference_mode`) and the masked scorer's `_masked`, checked against transformers and
against log-softmax worked out by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from test_edges_eval_data import _hf_span, hf_dir, hf_model, ours, tok  # noqa: F401  (the tiny Llama)
from llmctl.core.evaluate.choice import mc2
from llmctl.core.evaluate.lm import ScoringModel
from llmctl.core.evaluate.masked import MaskedScoringModel
from llmctl.errors import DataError

# -- core/evaluate/choice.py: mc2 ------------------------------------------------------------------


def test_mc2_is_the_normalised_mass_of_the_true_choices_by_hand():
    """lm-eval's `process_results_mc2`: exp of each log-likelihood, normalised over all choices, summed
    over the labels of 1 — in any order, and for choices so long that exp(ll) underflows to 0."""
    e = math.e
    assert mc2([-1.0, -2.0, -3.0], [], 0, {"labels": [1, 0, 1]}) == pytest.approx(
        (e ** -1 + e ** -3) / (e ** -1 + e ** -2 + e ** -3), rel=1e-12)
    assert mc2([-4.0, -1.0, -2.0, -1.0], [], 0, {"labels": [0, 1, 0, 0]}) == pytest.approx(
        e ** -1 / (e ** -4 + 2 * e ** -1 + e ** -2), rel=1e-12)
    assert mc2([-2.0, -5.0], [], 0, {"labels": [0, 0]}) == 0.0
    # log-likelihoods of long answers: exp(-600) is 0.0 in floats, the ratio is 1 / (1 + e^-1 + e^-100)
    assert mc2([-600.0, -601.0, -700.0], [], 0, {"labels": [1, 0, 1]}) == pytest.approx(
        (1 + e ** -100) / (1 + e ** -1 + e ** -100), rel=1e-12)
    assert mc2([-1.0, -800.0], [], 0, {"labels": [0, 1]}) == pytest.approx(e ** -799 / (1 + e ** -799), rel=1e-9)


@pytest.mark.parametrize("fields", [{}, {"labels": (1, 0)}, {"labels": "10"}, {"labels": [1]}, {"labels": [1, 0, 0]}])
def test_mc2_refuses_a_missing_or_mismatched_labels_field(fields):
    with pytest.raises(DataError, match=r"^the mc2 metric needs a 'labels' field: 1 \(true\) or 0 for each choice$"):
        mc2([-1.0, -2.0], ["a", "b"], 0, fields)


# -- core/evaluate/lm.py: features, score_rows, _score_shared --------------------------------------


class Bigram(nn.Module):
    """A causal model that returns its logits as a plain tensor (no `.logits`) and takes no
    `logits_to_keep`: each position's logits are a row of a table, indexed by the token there."""

    def __init__(self, vocab: int = 11, seed: int = 0):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 3)
        self.calls = []

    def forward(self, ids):
        self.calls.append(tuple(ids.shape))
        return self.table[ids]


def _bigram_score(model: Bigram, row: list[int], n: int) -> tuple[float, bool]:
    """log P and all-argmax of the last `n` tokens of `row`, log-softmax by hand."""
    total, greedy = 0.0, True
    for p in range(len(row) - n, len(row)):
        logits = model.table[row[p - 1]].double()
        total += (logits[row[p]] - torch.logsumexp(logits, 0)).item()
        greedy = greedy and int(logits.argmax()) == row[p]
    return total, greedy


def test_features_are_every_position_or_the_last_keep(hf_model, ours, tok):  # noqa: F811
    """An HF model's logits, or an llmctl model's final hidden states (its head gives HF's logits):
    all positions by default and for keep ≥ the length, else the last `keep`."""
    ids = torch.tensor([tok.encode("The quick brown fox jumps over")])
    length = ids.shape[1]
    with torch.no_grad():
        expected = hf_model(ids).logits
    hf, mine = ScoringModel(hf_model, tok, max_length=64), ScoringModel(ours, tok, max_length=64)
    for keep in [None, 0, 1, 3, length - 1, length, length + 2]:
        args = () if keep is None else (keep,)
        width = length if keep is None or not 0 < keep < length else keep
        got = hf.features(ids, *args)
        assert got.shape == (1, width, expected.shape[-1])
        torch.testing.assert_close(got, expected[:, length - width :], rtol=1e-5, atol=1e-5)
        feats = mine.features(ids, *args)
        assert feats.shape == (1, width, ours.cfg.hidden_size)
        with torch.no_grad():
            torch.testing.assert_close(ours.head(feats), expected[:, length - width :], rtol=1e-4, atol=1e-4)


def test_a_model_that_returns_a_tensor_is_scored_by_log_softmax():
    """Such a model takes no `logits_to_keep`, and is not given one when every position is needed: by
    default, for `keep` 0 and for `keep` of the length or more."""
    model = Bigram()
    lm = ScoringModel(model, None, max_length=16)
    rows = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 0, 1]]
    n = [len(r) - 1 for r in rows]
    ids = torch.tensor([rows[0][:-1]])
    for keep in [(), (0,), (3,), (4,)]:
        torch.testing.assert_close(lm.features(ids, *keep), model.table[ids])
    for score, row, k in zip(lm.score_rows(rows, n), rows, n):
        logprob, greedy = _bigram_score(model, row, k)
        assert (score.tokens, score.greedy) == (k, greedy)
        assert score.logprob == pytest.approx(logprob, rel=1e-5)


def test_score_rows_batches_the_longest_rows_first_within_both_limits(monkeypatch):
    """Each pass holds at most `batch_size` rows and `max_batch_tokens` padded tokens (a row longer
    than that alone); scores come back in the rows' order, equal to the log-softmax by hand.
    One torch thread, so the passes run one after another (with more, `parallel_map` runs them
    side by side and the order of the calls is not theirs)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    rows = [[1, 2, 3], list(range(1, 10)), [4, 5, 6, 7, 8], [9, 10], list(range(10, 1, -1)), [3, 1, 4, 1],
            list(range(25)) * 1]
    rows[-1] = [t % 11 for t in rows[-1]]
    n = [len(r) - 1 for r in rows]
    for batch_size, max_tokens in [(3, 20), (1, 1024), (16, 12)]:
        model = Bigram()
        lm = ScoringModel(model, None, max_length=32, batch_size=batch_size, max_batch_tokens=max_tokens)
        scores = lm.score_rows(rows, n)
        widths = [shape[1] + 1 for shape in model.calls]
        assert widths == sorted(widths, reverse=True)  # longest rows first
        assert sum(shape[0] for shape in model.calls) == len(rows)
        for b, t in model.calls:
            assert b <= batch_size and (b == 1 or b * (t + 1) <= max_tokens)
        for score, row, k in zip(scores, rows, n):
            assert score.logprob == pytest.approx(_bigram_score(model, row, k)[0], rel=1e-5)
    assert [shape[0] for shape in model.calls][0] == 1  # the 25-token row alone past 12 tokens


def test_shared_contexts_of_short_continuations_and_several_groups_equal_hf(hf_model, ours, tok):  # noqa: F811
    """Three contexts shared in one pass, with 2, 3 and 1 continuations: of at most two tokens (the
    continuation pass over their first tokens), and of one token each (no continuation pass)."""
    ids = tok.encode("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. To be, or not")
    contexts = [ids[:6], ids[8:17], ids[20:24]]
    for conts in ([[ids[6:8], [ids[30]]], [ids[17:19], [ids[3]], ids[40:42]], [ids[24:26]]],
                  [[[ids[6]], [ids[7]]], [[ids[17]], [ids[3]], [ids[40]]], [[ids[24]]]]):
        requests = [(ctx, c) for ctx, group in zip(contexts, conts) for c in group]
        lm = ScoringModel(ours, tok, max_length=64)
        calls = []
        score_shared = lm._score_shared
        lm._score_shared = lambda prefixes, cs: calls.append([len(c) for c in cs]) or score_shared(prefixes, cs)
        scores = lm.loglikelihood(requests, share_min_tokens=0)
        assert calls == [[3, 2, 1]]  # one chunk, longest context first
        for (ctx, cont), score in zip(requests, scores):
            logprob, greedy = _hf_span(hf_model, ctx + cont, len(cont))
            assert (score.tokens, score.greedy) == (len(cont), greedy)
            assert score.logprob == pytest.approx(logprob, rel=1e-5)


# -- core/evaluate/masked.py: _masked --------------------------------------------------------------


class Encoder(nn.Module):
    """A bidirectional model that returns its logits as a plain tensor: a position's logits are its
    token's row of one table plus the mean of the other table's rows over the row's unmasked tokens."""

    def __init__(self, vocab: int = 12, seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.own = nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2)
        self.context = nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2)

    def forward(self, input_ids, attention_mask):
        weights = attention_mask.to(self.context.dtype)
        mean = (self.context[input_ids] * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
        return self.own[input_ids] + mean[:, None]

    def pll(self, framed: list[int], p: int, mask_id: int) -> tuple[float, bool]:
        """log P(framed[p] | the rest) with framed[p] masked, alone and unpadded, by hand."""
        ids = list(framed)
        ids[p] = mask_id
        logits = (self.own[ids[p]] + self.context[ids].mean(0)).double()
        return (logits[framed[p]] - torch.logsumexp(logits, 0)).item(), int(logits.argmax()) == framed[p]


def test_a_masked_model_that_returns_a_tensor_is_scored_by_pseudo_log_likelihood():
    """Salazar et al.'s pseudo-log-likelihood: each scored token masked in its framed row, read by
    log-softmax at its position; rows of different lengths in one batch."""
    model = Encoder()
    tok = SimpleNamespace(mask_id=11, encode=lambda text, add_special_tokens: [1, 5, 2] if add_special_tokens else [5])
    lm = MaskedScoringModel(model, tok, max_length=32, batch_size=5)
    rows, n = [[3, 4, 5, 6], [7, 8], [9, 3, 4, 5, 6, 7]], [2, 2, 4]
    for score, row, k in zip(lm.score_rows(rows, n), rows, n):
        framed = [1, *row, 2]
        parts = [model.pll(framed, 1 + p, 11) for p in range(len(row) - k, len(row))]
        assert score.logprob == pytest.approx(sum(x for x, _ in parts), rel=1e-5)
        assert (score.tokens, score.greedy) == (k, all(g for _, g in parts))
