"""Text metrics, implemented here and equal to the reference libraries' numbers.

- `exact_match` with configurable normalisation (lm-evaluation-harness options).
- `corpus_bleu` = sacrebleu's `corpus_bleu` (13a tokenisation, exp smoothing, 0–100).
- `corpus_chrf` = sacrebleu's `corpus_chrf` (chrF2: char order 6, beta 2, 0–100).
- `rouge` = rouge-score's `RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)` F-measure.
- `mean_stderr` and `bootstrap_stderr` for standard errors.

References are given per example (`references[i]` = the list of references of hypothesis
`i`), unlike sacrebleu's reference streams.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from llmctl.core.registry import Registry

# ------------------------------------------------------------------ normalisation, exact match


def normalize(
    text: str,
    *,
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    ignore_articles: bool = False,
    regexes_to_ignore: Sequence[str] = (),
    strip: bool = True,
) -> str:
    """Normalise an answer before comparison (the options of lm-eval's `exact_match`)."""
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if ignore_articles:
        text = re.sub(r"\b(a|an|the)\b", " ", text, flags=re.IGNORECASE)
        text = " ".join(text.split())
    return text.strip() if strip else text


def exact_match(prediction: str, references: Sequence[str], **normalisation) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize(prediction, **normalisation)
    return float(any(pred == normalize(ref, **normalisation) for ref in references))


# ------------------------------------------------------------------ BLEU (sacrebleu-compatible)

_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def tokenize_13a(line: str) -> str:
    """mteval-v13a tokenisation, as sacrebleu's default `13a` tokenizer."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def _word_ngrams(tokens: list[str], max_order: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def bleu_stats(hypothesis: str, references: Sequence[str], *, lowercase: bool = False,
               tokenize: bool = True, max_order: int = 4) -> list[int]:
    """Sufficient statistics of one segment: [hyp_len, ref_len, correct_1..n, total_1..n]."""

    def prep(s: str) -> list[str]:
        s = s.lower() if lowercase else s
        s = s.rstrip()
        return (tokenize_13a(s) if tokenize else s).split()

    hyp = prep(hypothesis)
    refs = [prep(r) for r in references]
    ref_counts: Counter = Counter()
    for ref in refs:
        for gram, count in _word_ngrams(ref, max_order).items():
            ref_counts[gram] = max(ref_counts[gram], count)
    # closest reference length, ties broken towards the shorter one
    ref_len = min((abs(len(hyp) - len(r)), len(r)) for r in refs)[1] if refs else 0
    correct, total = [0] * max_order, [0] * max_order
    for gram, count in _word_ngrams(hyp, max_order).items():
        total[len(gram) - 1] += count
        correct[len(gram) - 1] += min(count, ref_counts.get(gram, 0))
    return [len(hyp), ref_len, *correct, *total]


def bleu_from_stats(stats: Sequence[int], *, smooth: str = "exp", max_order: int = 4) -> float:
    """BLEU (0–100) from summed segment statistics; `smooth` is 'exp' (NIST) or 'none'."""
    sys_len, ref_len = stats[0], stats[1]
    correct, total = stats[2 : 2 + max_order], stats[2 + max_order :]
    if not any(correct):
        return 0.0
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    precisions = [0.0] * max_order
    smooth_factor = 1.0
    for n in range(max_order):
        if total[n] == 0:
            break
        if correct[n] == 0:
            if smooth == "exp":
                smooth_factor *= 2
                precisions[n] = 100.0 / (smooth_factor * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    log_sum = sum(math.log(p) if p > 0 else -9999999999 for p in precisions)
    return bp * math.exp(log_sum / max_order)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], **options) -> float:
    """Corpus BLEU equal to `sacrebleu.corpus_bleu` with default settings."""
    stats = [bleu_stats(h, r, **options) for h, r in zip(hypotheses, references, strict=True)]
    return bleu_from_stats(_sum_stats(stats))


# ------------------------------------------------------------------ chrF (sacrebleu-compatible)

CHRF_ORDER, CHRF_BETA = 6, 2


def _char_ngrams(text: str, order: int) -> list[Counter]:
    text = "".join(text.split())
    return [Counter(text[i : i + n] for i in range(len(text) - n + 1)) for n in range(1, order + 1)]


def _chrf_f(stats: Sequence[int], beta: float = CHRF_BETA) -> float:
    factor = beta**2
    avg_prec = avg_rec = 0.0
    effective = 0
    for i in range(len(stats) // 3):
        n_hyp, n_ref, n_match = stats[3 * i : 3 * i + 3]
        if n_hyp > 0 and n_ref > 0:
            avg_prec += n_match / n_hyp
            avg_rec += n_match / n_ref
            effective += 1
    if effective:
        avg_prec, avg_rec = avg_prec / effective, avg_rec / effective
    if avg_prec + avg_rec == 0:
        return 0.0
    score = (1 + factor) * avg_prec * avg_rec
    return 100 * score / (factor * avg_prec + avg_rec)


def chrf_stats(hypothesis: str, references: Sequence[str], *, order: int = CHRF_ORDER) -> list[int]:
    """[hyp, ref, match] counts per character order, against the best-scoring reference."""
    hyp = _char_ngrams(hypothesis, order)
    best: list[int] = []
    best_f = -1.0
    for ref_text in references:
        stats: list[int] = []
        for h, r in zip(hyp, _char_ngrams(ref_text, order)):
            # hypothesis n-grams are not counted for an order the reference has none of
            stats += [sum(h.values()) if r else 0, sum(r.values()), sum(min(c, r[g]) for g, c in h.items() if g in r)]
        f = _chrf_f(stats)
        if f > best_f:
            best, best_f = stats, f
    return best


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus chrF equal to `sacrebleu.corpus_chrf` with default settings."""
    stats = [chrf_stats(h, r) for h, r in zip(hypotheses, references, strict=True)]
    return _chrf_f(_sum_stats(stats))


def _sum_stats(stats: Sequence[Sequence[int]]) -> list[int]:
    return [sum(column) for column in zip(*stats)]


# ------------------------------------------------------------------ ROUGE (rouge-score-compatible)


@dataclass(frozen=True)
class RougeScore:
    precision: float
    recall: float
    fmeasure: float


def rouge_tokenize(text: str) -> list[str]:
    """rouge-score's default tokenisation: lowercase, split on non-[a-z0-9]."""
    return [t for t in re.split(r"\s+", re.sub(r"[^a-z0-9]+", " ", text.lower())) if re.fullmatch(r"[a-z0-9]+", t)]


def _fmeasure(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_n(prediction: str, target: str, n: int) -> RougeScore:
    """ROUGE-n of one prediction against one target."""
    pred, tgt = rouge_tokenize(prediction), rouge_tokenize(target)
    p_grams = Counter(tuple(pred[i : i + n]) for i in range(len(pred) - n + 1))
    t_grams = Counter(tuple(tgt[i : i + n]) for i in range(len(tgt) - n + 1))
    overlap = sum(min(c, p_grams[g]) for g, c in t_grams.items())
    precision = overlap / max(sum(p_grams.values()), 1)
    recall = overlap / max(sum(t_grams.values()), 1)
    return RougeScore(precision, recall, _fmeasure(precision, recall))


def rouge_l(prediction: str, target: str) -> RougeScore:
    """ROUGE-L (longest common subsequence) of one prediction against one target."""
    pred, tgt = rouge_tokenize(prediction), rouge_tokenize(target)
    if not pred or not tgt:
        return RougeScore(0.0, 0.0, 0.0)
    prev = [0] * (len(pred) + 1)
    for t in tgt:
        row = [0]
        for j, p in enumerate(pred, 1):
            row.append(prev[j - 1] + 1 if t == p else max(prev[j], row[j - 1]))
        prev = row
    lcs = prev[-1]
    precision, recall = lcs / len(pred), lcs / len(tgt)
    return RougeScore(precision, recall, _fmeasure(precision, recall))


# ------------------------------------------------------------------ standard errors


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)), as lm-eval."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def aggregate(scores: dict[str, Sequence[float]], groups: Sequence[str] | None = None,
              other_groups: Sequence[Sequence[str]] = ()) -> dict[str, float]:
    """Means and standard errors of per-document scores. With `groups` (one per document),
    also `metric/group` per group and `metric_macro`, the mean over groups (its stderr from
    the groups' as independent samples); `other_groups` (more labels per document, e.g. MMLU's
    categories) add `metric/label` only. The plain `metric` and each group's are means over
    documents (lm-eval's size-weighted group averages, e.g. MMLU's)."""
    out: dict[str, float] = {}
    for name, values in scores.items():
        out[name], out[f"{name}_stderr"] = sum(values) / len(values), mean_stderr(values)
        for i, labels in enumerate([groups, *other_groups] if groups is not None else other_groups):
            by_group: dict[str, list[float]] = {}
            for g, v in zip(labels, values, strict=True):
                by_group.setdefault(g, []).append(v)
            means = {g: sum(v) / len(v) for g, v in sorted(by_group.items())}
            errors = {g: mean_stderr(v) for g, v in sorted(by_group.items())}
            if i == 0 and groups is not None:
                out[f"{name}_macro"] = sum(means.values()) / len(means)
                out[f"{name}_macro_stderr"] = math.sqrt(sum(e * e for e in errors.values())) / len(means)
            for g in means:
                out[f"{name}/{g}"], out[f"{name}/{g}_stderr"] = means[g], errors[g]
    return out


def bootstrap_stderr(stats: Sequence[Sequence[int]], score: Callable[[list[int]], float],
                     iters: int = 100, seed: int = 1234) -> float:
    """Bootstrap standard error of a corpus metric computed from per-segment statistics."""
    if len(stats) < 2:
        return float("nan")
    rng = random.Random(seed)
    samples = [score(_sum_stats(rng.choices(stats, k=len(stats)))) for _ in range(iters)]
    return math.sqrt(sum((s - sum(samples) / iters) ** 2 for s in samples) / (iters - 1))


# ------------------------------------------------------------------ the metric registry

METRICS: Registry[Callable[..., tuple[float, float]]] = Registry("metric")
"""name → fn(predictions, references, **options) -> (value, stderr)."""


def _per_example(fn: Callable[[str, Sequence[str]], float]):
    def metric(predictions: Sequence[str], references: Sequence[Sequence[str]], **options) -> tuple[float, float]:
        values = [fn(p, refs, **options) for p, refs in zip(predictions, references, strict=True)]
        return sum(values) / len(values), mean_stderr(values)

    return metric


def _best_rouge(kind: str):
    def score(prediction: str, references: Sequence[str]) -> float:
        one = (lambda t: rouge_l(prediction, t)) if kind == "L" else (lambda t: rouge_n(prediction, t, int(kind)))
        return max(one(t).fmeasure for t in references)

    return score


METRICS.register("exact_match")(_per_example(exact_match))
for _kind in ("1", "2", "L"):
    METRICS.register(f"rouge{_kind}")(_per_example(_best_rouge(_kind)))


def _corpus(stats_fn, score_fn):
    def metric(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, float]:
        stats = [stats_fn(p, refs) for p, refs in zip(predictions, references, strict=True)]
        return score_fn(_sum_stats(stats)), bootstrap_stderr(stats, score_fn)

    return metric


METRICS.register("bleu")(_corpus(bleu_stats, bleu_from_stats))
METRICS.register("chrf")(_corpus(chrf_stats, _chrf_f))
