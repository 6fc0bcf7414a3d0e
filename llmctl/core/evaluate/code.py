"""Code generation scored by running unit tests: pass@k (HumanEval, MBPP).

Each problem gets `samples` completions (greedy when 1, else sampled at `temperature`); the
`program` template joins the document and a completion into a Python program whose exit
status is the verdict, run in `llmctl.core.sandbox` (time, memory, file and process limits,
no network). pass@k is the unbiased estimator of Chen et al. (2021), averaged over problems.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmctl.core.evaluate.generation import Generation
from llmctl.core.evaluate.tasks import TASK_TYPES
from llmctl.errors import ConfigError


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of n samples, c of them correct, include a
    correct one; as a product, stable for large n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


@TASK_TYPES.register("code")
@dataclass
class CodeGeneration(Generation):
    """Generate `samples` programs per problem, run `program` in the sandbox, report pass@k."""

    program: str = "{{ prompt }}{{ completion }}"  # Jinja over the document and `completion`
    k: list[int] | None = None  # default: those of 1, 10, 100 within `samples`
    metrics: list[str] = field(default_factory=list)
    timeout: float = 10.0  # seconds per program
    memory_mb: int = 1024  # address space per program
    temperature: float = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        self.template("program")
        if self.k is None:
            self.k = [k for k in (1, 10, 100) if k <= self.samples]
        if not self.k or min(self.k) < 1 or max(self.k) > self.samples:
            raise ConfigError(f"task {self.name}: pass@k needs 1 <= k <= --samples ({self.samples}), got k={self.k}")

    def references(self, doc) -> list[str]:
        return []

    def example_target(self, doc) -> str:
        raise ConfigError(f"task {self.name}: few-shot examples need a 'fewshot_target' template")

    def run(self, lm) -> dict[str, float]:
        from llmctl.core.sandbox import Limits, run_many

        docs = self.documents()
        prompts, texts = self.generations(lm, docs)
        programs = [self.render("program", d, completion=t) for d, gen in zip(docs, texts) for t in gen]
        with self.report.progress(f"{self.name} tests", total=len(programs), unit="prog"):
            results = run_many(programs, Limits(timeout=self.timeout, memory_mb=self.memory_mb),
                               report=self.report)
        scores: dict[str, list[float]] = {f"pass@{k}": [] for k in self.k}
        for i, (doc, prompt, generated) in enumerate(zip(docs, prompts, texts)):
            verdicts = results[i * self.samples : (i + 1) * self.samples]
            correct = sum(r.passed for r in verdicts)
            for k in self.k:
                scores[f"pass@{k}"].append(pass_at_k(self.samples, correct, k))
            self.log(doc=doc[0], prompt=prompt, generations=generated, statuses=[r.status for r in verdicts],
                     correct=correct, **{name: values[-1] for name, values in scores.items()})
        return {**self.summarize(scores, docs), "examples": len(docs)}
