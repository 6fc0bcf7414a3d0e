"""Pairwise accuracy on preference pairs: how often the chosen answer wins.

    type: pairwise
    dataset: {path: held_out_pairs.jsonl}     # {"prompt", "chosen", "rejected"} records
    prompt: "{{ prompt }}"

A reward model (a classifier with `num_labels`) scores prompt + answer encoded as it was
trained (`SFTEncoder`: the prompt with the tokenizer's special tokens, the answer, EOS); a
language model compares the log-likelihoods of the two answers after the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmctl.core.evaluate.tasks import TASK_TYPES, Doc, DocumentTask, field_value
from llmctl.errors import DataError


@TASK_TYPES.register("pairwise")
@dataclass
class Pairwise(DocumentTask):
    """`acc`: the share of pairs whose `chosen` field outscores its `rejected` field."""

    prompt: str = "{{ prompt }}"
    chosen: str = "chosen"
    rejected: str = "rejected"
    target_delimiter: str = ""  # answers carry their own leading space, as in training data

    def example_target(self, doc: Doc) -> str:
        return self.answer(doc, self.chosen)

    def answer(self, doc: Doc, key: str) -> str:
        value = field_value(doc, key)
        if not isinstance(value, str):
            raise DataError(f"{doc[0]}: field '{key}' must be a string")
        return value

    def run(self, lm) -> dict[str, float]:
        docs = self.documents()
        contexts = self.contexts(docs)
        answers = [(self.answer(d, self.chosen), self.answer(d, self.rejected)) for d in docs]
        requests = [(c, self.target_delimiter + a) for c, pair in zip(contexts, answers) for a in pair]
        with self.report.progress(self.name, total=len(requests), unit="req") as bar:
            if getattr(lm.model.cfg, "num_labels", None):
                scores = _reward_scores(lm, requests, bar)
            else:
                scores = [s.logprob for s in lm.loglikelihood([lm.encode_pair(c, x) for c, x in requests], bar)]
        wins = [float(scores[2 * i] > scores[2 * i + 1]) for i in range(len(docs))]
        for doc, win, i in zip(docs, wins, range(0, len(scores), 2)):
            self.log(doc=doc[0], chosen_score=scores[i], rejected_score=scores[i + 1], acc=win)
        return {**self.summarize({"acc": wins}, docs), "examples": len(docs)}


def _reward_scores(lm, requests: list[tuple[str, str]], bar) -> list[float]:
    """The reward model's score of every (prompt, answer), a batch of rows at a time."""
    import torch

    from llmctl.core.data.sft import SFTEncoder
    from llmctl.core.model.reward import sequence_scores

    encoder = SFTEncoder(lm.tokenizer)
    pad = lm.model.cfg.pad_token_id
    step = lm.batch_size if pad is not None else 1  # no pad token: a row's score is read at its last position
    rows = [encoder({"prompt": c, "completion": x}, "pairwise").ids[-lm.max_length:] for c, x in requests]
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(rows), step):
            batch = rows[start:start + step]
            width = max(map(len, batch))
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in batch], device=lm.device)
            out += sequence_scores(lm.model, ids, pad)[:, 0].float().tolist()
            bar.advance(len(batch))
    return out
