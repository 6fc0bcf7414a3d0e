"""Edges of the text metrics the sacrebleu / rouge-score parity sentences miss (found by mutation testing)."""

import math
import random
import statistics

import pytest

from llmctl.core.evaluate import metrics

ODD = [
    "a <skipped> b",
    "line one\nline two",
    "hyphen-\nated word",
    "x &amp; y &lt;z&gt; &quot;q&quot;",
    "well-\n",
]


def test_exact_match_options_one_at_a_time():
    em = metrics.exact_match
    assert em("42.", ["42"]) == 0.0 and em("Answer", ["answer"]) == 0.0  # nothing ignored by default
    assert em("ANSWER", ["answer"], ignore_case=True) == 1.0
    assert em("answer", ["ANSWER"], ignore_case=True) == 1.0  # the references are normalised too
    assert em("Straße", ["STRASSE"], ignore_case=True) == 0.0  # lower-cased (as lm-eval), not upper-cased
    assert em("The big answer", ["big answer"], ignore_articles=True) == 1.0  # capitalised article, case kept
    assert em("the big answer", ["big  answer"], ignore_articles=True) == 1.0  # whitespace collapsed to one space
    assert em("big answer", ["Big answer"], ignore_articles=True) == 0.0
    assert metrics.normalize(" x ", strip=False) == " x "
    assert metrics.normalize("the  big answer", ignore_articles=True) == "big answer"
    assert metrics.METRICS.get("exact_match")(["A", "b"], [["a"], ["c"]], ignore_case=True) == (0.5, 0.5)


@pytest.mark.parametrize("line", ODD)
def test_13a_tokenizer_equals_sacrebleus(line):
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    assert metrics.tokenize_13a(line) == Tokenizer13a()(line)


@pytest.mark.parametrize("options", [{"lowercase": True}, {"tokenize": "none"}])
def test_bleu_options_equal_sacrebleus(options):
    import sacrebleu
    hyps = ["The Cat sat ON the mat.", "well-\n", "A b, c d. E f", "x &amp; y &lt;z&gt;"]
    refs = ["the cat sat on The Mat .", "well", "a B , c d . e F", "x & y <z>"]
    ours = {"tokenize": False} if options.get("tokenize") == "none" else options
    expected = sacrebleu.corpus_bleu(hyps, [refs], **options).score
    assert metrics.corpus_bleu(hyps, [[r] for r in refs], **ours) == pytest.approx(expected, rel=1e-12)
    assert expected != pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)  # the option matters here


def test_bleu_closest_reference_length_and_tiny_precisions():
    import sacrebleu
    # the closest reference is the longer one; and 60 4-grams with no match: a smoothed precision below 1%
    hyp = "one two three four five"
    refs = ["one two", "one two three four five six"]
    assert metrics.bleu_stats(hyp, refs)[1] == 6
    assert metrics.corpus_bleu([hyp], [refs]) == pytest.approx(sacrebleu.corpus_bleu([hyp], [[r] for r in refs]).score)
    long_hyp = " ".join(f"w{i} {i}" for i in range(32))
    long_ref = " ".join(f"w{i} x{i}" for i in range(32))
    expected = sacrebleu.corpus_bleu([long_hyp], [[long_ref]]).score
    assert 0 < expected and metrics.corpus_bleu([long_hyp], [[long_ref]]) == pytest.approx(expected, rel=1e-12)
    assert metrics.bleu_stats("a b", []) == [2, 0, 0, 0, 0, 0, 2, 1, 0, 0]  # no reference: nothing matches


@pytest.mark.parametrize("name", ["bleu", "chrf", "rouge1", "exact_match"])
def test_predictions_and_references_of_different_lengths_are_refused(name):
    with pytest.raises(ValueError):
        metrics.METRICS.get(name)(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        (metrics.corpus_bleu if name == "bleu" else metrics.corpus_chrf)(["a", "b"], [["a"]])


@pytest.mark.parametrize("pair", [("cat", "the cat"), ("the cat", "cat"), ("a b", "a b c"), ("a b c", "a b")])
def test_rouge_of_one_and_two_token_texts_equals_rouge_score(pair):
    from rouge_score import rouge_scorer
    hyp, ref = pair
    expected = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"]).score(ref, hyp)
    ours = {"rouge1": metrics.rouge_n(hyp, ref, 1), "rouge2": metrics.rouge_n(hyp, ref, 2), "rougeL": metrics.rouge_l(hyp, ref)}
    for name, score in ours.items():
        assert (score.precision, score.recall, score.fmeasure) == pytest.approx(tuple(expected[name]), abs=1e-12), name
    for name in ours:  # the registered metrics: the best of the references
        assert metrics.METRICS.get(name)([hyp], [["zzz", ref]])[0] == pytest.approx(expected[name].fmeasure), name


def test_mean_stderr_of_two_values():
    assert metrics.mean_stderr([0.0, 1.0]) == pytest.approx(0.5)


def test_bootstrap_stderr_is_the_resampled_scores_sample_deviation():
    rng = random.Random(0)
    stats = [[rng.randint(0, 9), 1] for _ in range(7)]
    seen = []

    def score(s):  # a mean; also records the resample's size
        seen.append((s[0] / s[1], s[1]))
        return s[0] / s[1]

    se = metrics.bootstrap_stderr(stats, score, iters=50)
    assert len(seen) == 50 and {k for _, k in seen} == {7}
    assert se == pytest.approx(statistics.stdev(v for v, _ in seen), rel=1e-12)
    assert metrics.bootstrap_stderr(stats, score, iters=50) == se  # seeded
    assert math.isfinite(metrics.bootstrap_stderr(stats[:2], score)) and math.isnan(metrics.bootstrap_stderr(stats[:1], score))


def test_aggregate_macro_stderr_and_labels_without_groups():
    values = [1.0, 0.0, 1.0, 1.0, 0.0]
    groups = ["a", "a", "b", "b", "b"]
    out = metrics.aggregate({"acc": values}, groups)
    se_a, se_b = metrics.mean_stderr([1.0, 0.0]), metrics.mean_stderr([1.0, 1.0, 0.0])
    assert out["acc_macro"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert out["acc_macro_stderr"] == pytest.approx(math.sqrt(se_a**2 + se_b**2) / 2)
    assert out["acc/b_stderr"] == pytest.approx(se_b)
    only_labels = metrics.aggregate({"acc": values}, None, [groups])
    assert "acc_macro" not in only_labels and only_labels["acc/a"] == 0.5 and only_labels["acc"] == 0.6
    with pytest.raises(ValueError):
        metrics.aggregate({"acc": values}, groups[:4])
