"""Multiple choice by log-likelihood, with lm-evaluation-harness semantics.

For each document the model scores `context + target_delimiter + choice` for every choice;
`acc` takes the choice with the highest log-likelihood, `acc_norm` the highest
log-likelihood per character of the choice. Both with standard errors.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmctl.console import progress
from llmctl.core.evaluate.metrics import mean_stderr
from llmctl.core.evaluate.tasks import TASK_TYPES, Doc, DocumentTask, field_value
from llmctl.errors import DataError


def choice_metrics(logprobs: list[list[float]], choices: list[list[str]], golds: list[int]) -> dict[str, float]:
    """acc and acc_norm (log-likelihood / character length of the choice) with stderrs."""
    acc, acc_norm = [], []
    for lls, texts, gold in zip(logprobs, choices, golds, strict=True):
        acc.append(float(max(range(len(lls)), key=lambda i: lls[i]) == gold))
        normed = [ll / max(len(t), 1) for ll, t in zip(lls, texts)]
        acc_norm.append(float(max(range(len(normed)), key=lambda i: normed[i]) == gold))
    n = len(acc)
    return {"acc": sum(acc) / n, "acc_stderr": mean_stderr(acc),
            "acc_norm": sum(acc_norm) / n, "acc_norm_stderr": mean_stderr(acc_norm)}


@TASK_TYPES.register("multiple_choice")
@dataclass
class MultipleChoice(DocumentTask):
    """One log-likelihood per choice; `choices` and `gold` name the document fields."""

    choices: str = "choices"  # field with the list of choice strings
    gold: str = "gold"  # field with the index of the right choice (or its text)

    def options(self, doc: Doc) -> tuple[list[str], int]:
        """The choice strings and gold index of a document; DataError naming its line."""
        where = doc[0]
        texts = field_value(doc, self.choices)
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

    def run(self, lm) -> dict[str, float]:
        docs = self.documents()
        options = [self.options(d) for d in docs]
        requests = [lm.encode_pair(context, self.target_delimiter + text)
                    for context, (texts, _) in zip(self.contexts(docs), options) for text in texts]
        with progress(self.name, total=len(requests), unit="req") as bar:
            scores = lm.loglikelihood(requests, bar)
        logprobs, i = [], 0
        for texts, _ in options:
            logprobs.append([s.logprob for s in scores[i : i + len(texts)]])
            i += len(texts)
        result = choice_metrics(logprobs, [t for t, _ in options], [g for _, g in options])
        return {**result, "examples": len(docs)}
