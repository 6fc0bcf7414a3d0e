"""Multiple choice by log-likelihood, with lm-evaluation-harness semantics.

For each document the model scores `context + target_delimiter + choice` for every choice;
`acc` takes the choice with the highest log-likelihood, `acc_norm` the highest
log-likelihood per character of the choice, `mc2` (TruthfulQA) is the probability mass of
the true choices (`labels` field) after normalising over all choices. All with standard
errors; with `group_by`, per group and macro-averaged. `partial_choice` (WinoGrande's partial
scoring) scores one shared continuation after one context per choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from llmctl.core.evaluate.metrics import aggregate
from llmctl.core.evaluate.tasks import TASK_TYPES, Doc, DocumentTask, field_value
from llmctl.core.registry import Registry
from llmctl.errors import ConfigError, DataError

# per-document scores: (log-likelihoods, choice texts, gold index, document fields) → score
CHOICE_METRICS: Registry[Callable[[list[float], list[str], int, dict], float]] = Registry("choice metric")


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


@CHOICE_METRICS.register("acc")
def acc(lls: list[float], texts: list[str], gold: int, fields: dict) -> float:
    return float(_argmax(lls) == gold)


@CHOICE_METRICS.register("acc_norm")
def acc_norm(lls: list[float], texts: list[str], gold: int, fields: dict) -> float:
    return float(_argmax([ll / max(len(t), 1) for ll, t in zip(lls, texts)]) == gold)


@CHOICE_METRICS.register("mc2")
def mc2(lls: list[float], texts: list[str], gold: int, fields: dict) -> float:
    """Normalised probability of the choices labelled 1 in the `labels` field (TruthfulQA MC2)."""
    top = max(lls)
    probs = [math.exp(ll - top) for ll in lls]
    labels = fields.get("labels")
    if not isinstance(labels, list) or len(labels) != len(lls):
        raise DataError("the mc2 metric needs a 'labels' field: 1 (true) or 0 for each choice")
    return sum(p for p, label in zip(probs, labels, strict=True) if label == 1) / sum(probs)


def choice_metrics(logprobs: list[list[float]], choices: list[list[str]], golds: list[int]) -> dict[str, float]:
    """acc and acc_norm (log-likelihood / character length of the choice) with stderrs."""
    rows = list(zip(logprobs, choices, golds, strict=True))
    return aggregate({name: [CHOICE_METRICS.get(name)(lls, texts, gold, {}) for lls, texts, gold in rows]
                      for name in ("acc", "acc_norm")})


@TASK_TYPES.register("multiple_choice")
@dataclass
class MultipleChoice(DocumentTask):
    """One log-likelihood per choice; `choices` and `gold` name the document fields."""

    choices: str = "choices"  # field with the list of choice strings
    gold: str = "gold"  # field with the index of the right choice (or its text)
    choice_texts: list[str] = field(default_factory=list)  # fixed choices for every document (MMLU: A-D)
    metrics: list[str] = field(default_factory=lambda: ["acc", "acc_norm"])  # of CHOICE_METRICS

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in self.metrics:
            if name not in CHOICE_METRICS:
                raise ConfigError(f"task {self.name}: config key 'metrics': unknown metric '{name}'; "
                                  f"choose from: {', '.join(CHOICE_METRICS.names())}")

    def options(self, doc: Doc) -> tuple[list[str], int]:
        """The choice strings and gold index of a document; DataError naming its line."""
        where = doc[0]
        texts = list(self.choice_texts) or field_value(doc, self.choices)
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise DataError(f"{where}: field '{self.choices}' must be a non-empty list of strings")
        gold = field_value(doc, self.gold)
        if isinstance(gold, str) and not gold.lstrip("-").isdigit():
            if gold not in texts:
                raise DataError(f"{where}: gold answer {gold!r} is not one of the choices")
            gold = texts.index(gold)
        if isinstance(gold, bool) or not isinstance(gold, (int, str)) or not 0 <= int(gold) < len(texts):
            raise DataError(f"{where}: gold index {gold!r} out of range for {len(texts)} choices")
        return texts, int(gold)

    def example_target(self, doc: Doc) -> str:
        texts, gold = self.options(doc)
        return texts[gold]

    def requests(self, docs: list[Doc], options: list[tuple[list[str], int]]) -> list[tuple[str, str]]:
        """(context, continuation) strings, one per choice of every document."""
        return [(context, self.target_delimiter + text)
                for context, (texts, _) in zip(self.contexts(docs), options) for text in texts]

    def run(self, lm) -> dict[str, float]:
        docs = self.documents()
        options = [self.options(d) for d in docs]
        pairs = self.requests(docs, options)
        with self.report.progress(self.name, total=len(pairs), unit="req") as bar:
            scores = lm.loglikelihood([lm.encode_pair(c, x) for c, x in pairs], bar)
        per_doc: dict[str, list[float]] = {name: [] for name in self.metrics}
        i = 0
        for doc, (texts, gold) in zip(docs, options):
            lls = [s.logprob for s in scores[i : i + len(texts)]]
            values = {name: CHOICE_METRICS.get(name)(lls, texts, gold, doc[1]) for name in self.metrics}
            for name, value in values.items():
                per_doc[name].append(value)
            self.log(doc=doc[0], requests=pairs[i : i + len(texts)], loglikelihoods=lls, gold=gold, **values)
            i += len(texts)
        return {**self.summarize(per_doc, docs), "examples": len(docs)}


@TASK_TYPES.register("partial_choice")
@dataclass
class PartialChoice(MultipleChoice):
    """Partial scoring (WinoGrande): the `continuation` field is scored after each context of
    the `choices` field (the sentence completed by each option), as lm-eval's multiple inputs."""

    choices: str = "contexts"
    continuation: str = "continuation"  # field with the shared continuation
    prompt: str = "{{ contexts[gold] }}"  # a few-shot example: its right context …
    metrics: list[str] = field(default_factory=lambda: ["acc"])

    def example_target(self, doc: Doc) -> str:  # … then its continuation
        return str(field_value(doc, self.continuation))

    def requests(self, docs: list[Doc], options: list[tuple[list[str], int]]) -> list[tuple[str, str]]:
        return [(prefix + context, self.target_delimiter + self.example_target(doc))
                for prefix, doc, (contexts, _) in zip(self.prefixes(docs), docs, options) for context in contexts]
