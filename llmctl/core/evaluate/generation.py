"""Generation tasks: prompt → generated answer → exact_match / BLEU / chrF / ROUGE.

Generation stops at the task's `until` strings. An `answer_regex` extracts the answer (its
last match, or the one `answer_match` indexes; the first non-empty group if it has groups,
as lm-eval's regex filter). With `samples > 1` each prompt is sampled that many times and
the most common extracted answer wins (self-consistency); `chain_of_thought` wraps the
prompt in `cot_prompt`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

from llmctl.core.evaluate.metrics import METRICS
from llmctl.core.evaluate.tasks import TASK_TYPES, Doc, DocumentTask, field_value
from llmctl.errors import ConfigError, DataError, UsageError


@dataclass
class Normalize:
    """How `exact_match` normalises prediction and reference before comparing."""

    ignore_case: bool = False
    ignore_punctuation: bool = False
    ignore_articles: bool = False
    regexes_to_ignore: list[str] = field(default_factory=list)
    strip: bool = True


@TASK_TYPES.register("generate")
@dataclass
class Generation(DocumentTask):
    """Generate an answer per document and score it against the `target` field."""

    prompt: str = "{{ input }}"
    target: str = "target"  # field with the reference (a string or a list of strings)
    until: list[str] = field(default_factory=lambda: ["\n"])
    max_new_tokens: int = 32
    metrics: list[str] = field(default_factory=lambda: ["exact_match"])
    normalize: Normalize = field(default_factory=Normalize)
    answer_regex: str | None = None
    answer_match: int = -1  # which match of answer_regex: -1 the last (lm-eval's flexible), 0 the first (strict)
    samples: int = 1  # > 1: sample this many answers and majority-vote (self-consistency)
    temperature: float = 0.7  # sampling temperature when samples > 1
    chain_of_thought: bool = False
    cot_prompt: str = "{{ prompt }} Let's think step by step."

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in self.metrics:
            if name not in METRICS:
                raise ConfigError(f"task {self.name}: config key 'metrics': unknown metric '{name}'; "
                                  f"choose from: {', '.join(METRICS.names())}")
        if self.samples < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"task {self.name}: 'samples' and 'max_new_tokens' must be ≥ 1")
        try:
            self._regex = re.compile(self.answer_regex) if self.answer_regex else None
        except re.error as exc:
            raise ConfigError(f"task {self.name}: config key 'answer_regex': {exc}") from None
        if self.chain_of_thought:
            self.template("cot_prompt")

    def references(self, doc: Doc) -> list[str]:
        value = field_value(doc, self.target)
        refs = value if isinstance(value, list) else [value]
        if not refs or not all(isinstance(r, (str, int, float)) for r in refs):
            raise DataError(f"{doc[0]}: field '{self.target}' must be a string or a list of strings")
        return [str(r) for r in refs]

    def example_target(self, doc: Doc) -> str:
        return self.references(doc)[0]

    def extract(self, text: str) -> str:
        """The answer in a generation: the regex's last match, else the whole text."""
        if self._regex is None:
            return text
        matches = list(self._regex.finditer(text))
        if not matches:
            return ""
        match = matches[self.answer_match] if -len(matches) <= self.answer_match < len(matches) else matches[-1]
        if not self._regex.groups:
            return match.group(0)
        return next((g for g in match.groups() if g), "").strip()

    def generations(self, lm, docs: list[Doc]) -> tuple[list[str], list[list[str]]]:
        """Each document's prompt and its `samples` generated texts (greedy when 1)."""
        from llmctl.core.generate import GenerationConfig, generate

        if not getattr(lm, "can_generate", True):
            raise UsageError(f"task {self.name} generates text: it needs a causal language model, not an encoder")
        prompts = self.contexts(docs)
        if self.chain_of_thought:
            prompts = [self.render("cot_prompt", d, prompt=p) for d, p in zip(docs, prompts)]
        cfg = GenerationConfig(max_new_tokens=self.max_new_tokens, stop=list(self.until),
                               temperature=self.temperature if self.samples > 1 else 0.0,
                               seed=lm.seed,
                               batch_size=lm.batch_size, truncate="left")
        texts: list[list[str]] = []
        with self.report.progress(self.name, total=len(docs), unit="ex") as bar:
            for start in range(0, len(docs), lm.batch_size):
                batch = [p for p in prompts[start : start + lm.batch_size] for _ in range(self.samples)]
                results = generate(lm.model, lm.tokenizer, batch, cfg, context=lm.max_length, report=self.report,
                                   first_index=start * self.samples)  # the same draws whatever the batch size
                texts += [[r.text for r in results[i : i + self.samples]] for i in range(0, len(results), self.samples)]
                bar.advance(len(batch) // self.samples)
        return prompts, texts

    def run(self, lm) -> dict[str, float]:
        docs = self.documents()
        references = [self.references(d) for d in docs]
        prompts, texts = self.generations(lm, docs)
        predictions = []
        for doc, prompt, generated, refs in zip(docs, prompts, texts, references):
            answers = [self.extract(t) for t in generated]
            predictions.append(Counter(answers).most_common(1)[0][0])
            self.log(doc=doc[0], prompt=prompt, generations=generated, answer=predictions[-1], references=refs)
        out: dict[str, float] = {}
        for name in self.metrics:
            kwargs = asdict(self.normalize) if name == "exact_match" else {}
            out[name], out[f"{name}_stderr"] = METRICS.get(name)(predictions, references, **kwargs)
        return {**out, "examples": len(docs)}
