"""Our BLEU / chrF / ROUGE equal sacrebleu's and rouge-score's on a fixed set of sentences."""

import math

import pytest

from llmctl.core.evaluate import metrics

HYPS = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog!",
    "It's 3.5 degrees -- colder than yesterday, isn't it?",
    "Nothing in common here",
    "",
    "the the the the",
    "Prices rose 12-15% in 2023 (see Table 3).",
    "He said &quot;hello&quot; & left.",
    "Ünïcödé wörds and café au lait",
    "short",
]
REFS_A = [
    "The cat is sitting on the mat.",
    "The quick brown fox jumped over the lazy dog.",
    "It is 3.5 degrees, colder than yesterday, is it not?",
    "Completely different sentence",
    "Something",
    "the cat",
    "Prices rose 12-15 % in 2023 (see table 3).",
    'He said "hello" and left.',
    "Unicode words and cafe au lait",
    "a much longer reference sentence than the hypothesis",
]
REFS_B = [
    "There is a cat on the mat.",
    "A fast brown fox leaps over a lazy dog.",
    "Three and a half degrees; colder than yesterday.",
    "Nothing in common",
    "",
    "the",
    "Prices increased by 12 to 15 percent in 2023.",
    "He greeted them and left.",
    "Unicode words, café au lait",
    "short one",
]


def _per_example(*streams):
    return [[s[i] for s in streams] for i in range(len(streams[0]))]


@pytest.mark.parametrize("streams", [[REFS_A], [REFS_A, REFS_B]])
def test_bleu_equals_sacrebleu(streams):
    import sacrebleu
    refs = _per_example(*streams)
    expected = sacrebleu.corpus_bleu(HYPS, streams).score
    assert metrics.corpus_bleu(HYPS, refs) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # one segment at a time too (short segments exercise smoothing and brevity penalty)
    for hyp, ref in zip(HYPS, refs):
        expected = sacrebleu.corpus_bleu([hyp], [[r] for r in ref]).score
        assert metrics.corpus_bleu([hyp], [ref]) == pytest.approx(expected, rel=1e-12, abs=1e-12), hyp


@pytest.mark.parametrize("streams", [[REFS_A], [REFS_A, REFS_B]])
def test_chrf_equals_sacrebleu(streams):
    import sacrebleu
    refs = _per_example(*streams)
    assert metrics.corpus_chrf(HYPS, refs) == pytest.approx(sacrebleu.corpus_chrf(HYPS, streams).score, rel=1e-12)
    for hyp, ref in zip(HYPS, refs):
        expected = sacrebleu.corpus_chrf([hyp], [[r] for r in ref]).score
        assert metrics.corpus_chrf([hyp], [ref]) == pytest.approx(expected, rel=1e-12, abs=1e-12), hyp


def test_rouge_equals_rouge_score():
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    for hyp, ref in zip(HYPS, REFS_A):
        expected = scorer.score(ref, hyp)
        ours = {"rouge1": metrics.rouge_n(hyp, ref, 1), "rouge2": metrics.rouge_n(hyp, ref, 2),
                "rougeL": metrics.rouge_l(hyp, ref)}
        for name, score in ours.items():
            for field in ("precision", "recall", "fmeasure"):
                assert getattr(score, field) == pytest.approx(getattr(expected[name], field), abs=1e-12), (name, hyp)


def test_registry_metrics_and_stderr():
    refs = _per_example(REFS_A)
    value, stderr = metrics.METRICS.get("rouge1")(HYPS, refs)
    per = [metrics.rouge_n(h, r[0], 1).fmeasure for h, r in zip(HYPS, refs)]
    assert value == pytest.approx(sum(per) / len(per))
    assert stderr == pytest.approx(metrics.mean_stderr(per))
    bleu, bleu_se = metrics.METRICS.get("bleu")(HYPS, refs)
    assert bleu == pytest.approx(metrics.corpus_bleu(HYPS, refs)) and bleu_se > 0
    # standard error of the mean: sample std / sqrt(n)
    assert metrics.mean_stderr([0, 1, 1, 0]) == pytest.approx(math.sqrt(1 / 3 / 4))
    assert math.isnan(metrics.mean_stderr([1.0]))


def test_exact_match_normalisation():
    assert metrics.exact_match(" 42 ", ["42"]) == 1.0
    assert metrics.exact_match("The Answer!", ["answer"]) == 0.0
    assert metrics.exact_match("The Answer!", ["answer"], ignore_case=True, ignore_punctuation=True,
                               ignore_articles=True) == 1.0
    assert metrics.exact_match("answer: 7", ["7"], regexes_to_ignore=[r"^answer:\s*"]) == 1.0
    assert metrics.exact_match("x", ["y", "x"]) == 1.0
