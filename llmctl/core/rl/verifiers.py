"""Verifiers: rewards for sampled completions, checked against each record's fields.

    verifiers = build_verifiers({"number": {}, "unit_tests": {"timeout": 2, "weight": 0.5}})
    rewards, reasons = score(verifiers, prompts, completions, records)   # [N, V] floats, [N][V] reasons

A verifier is a dataclass whose fields are its settings (`weight` is taken out for the sum)
with `verify(prompts, completions, records) -> list[Verdict]`, and optionally `warnings() -> list[str]`,
told to the user before training (`unit_tests`: programs that will reach the network). Built in:

| name          | reward 1 when                                                   | settings                 |
| ------------- | --------------------------------------------------------------- | ------------------------ |
| `exact_match` | the normalised completion equals the record's `field`            | field, ignore_case, …    |
| `regex`       | the `pattern`'s `match`-th match (its first group) equals it     | pattern, match, field    |
| `number`      | the last number in the completion equals the field's number      | field, tolerance         |
| `function`    | a Python function `module:attr` says so (TRL's reward functions) | entry_point              |
| `unit_tests`  | completion + the record's tests exit 0 in the sandbox            | field, timeout, memory_mb|
| `reward_model`| (a score, not 0/1) a reward model's score of prompt + completion | path, batch_size         |

Plugins add verifiers through the `llmctl.verifiers` entry-point group.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from llmctl.core.registry import Registry
from llmctl.errors import ConfigError, DataError

VERIFIERS: Registry[type] = Registry("verifier", "llmctl.verifiers")


@dataclass(frozen=True)
class Verdict:
    reward: float
    reason: str  # why: correct, wrong, no_answer, passed, failed, timeout, memory, …


def _answer(record: dict, field: str, name: str) -> Any:
    if field not in record:
        raise DataError(f"verifier {name}: a record lacks the field '{field}' (it has {', '.join(sorted(record))})")
    return record[field]


def _verdict(ok: bool) -> Verdict:
    return Verdict(1.0, "correct") if ok else Verdict(0.0, "wrong")


@VERIFIERS.register("exact_match")
@dataclass
class ExactMatch:
    """The whole completion, normalised as eval's `exact_match`, against the field."""

    field: str = "answer"
    ignore_case: bool = False
    ignore_punctuation: bool = False
    ignore_articles: bool = False

    def verify(self, prompts, completions, records) -> list[Verdict]:
        from llmctl.core.evaluate.metrics import exact_match

        options = dict(ignore_case=self.ignore_case, ignore_punctuation=self.ignore_punctuation,
                       ignore_articles=self.ignore_articles)
        return [_verdict(exact_match(c, [str(_answer(r, self.field, "exact_match"))], **options) == 1.0)
                for c, r in zip(completions, records)]


@VERIFIERS.register("regex")
@dataclass
class Regex:
    """The `match`-th match of `pattern` (its first non-empty group if it has groups; -1: the
    last match) equals the field, both stripped."""

    pattern: str = ""
    match: int = -1
    field: str = "answer"

    def __post_init__(self):
        try:
            self._regex = re.compile(self.pattern)
        except re.error as exc:
            raise ConfigError(f"verifier regex: pattern {self.pattern!r}: {exc}") from None
        if not self.pattern:
            raise ConfigError("verifier regex: give a pattern")

    def extract(self, text: str) -> str | None:
        found = list(self._regex.finditer(text))
        if not -len(found) <= self.match < len(found):
            return None
        m = found[self.match]
        return next((g for g in m.groups() if g), "") if self._regex.groups else m.group(0)

    def verify(self, prompts, completions, records) -> list[Verdict]:
        verdicts = []
        for c, r in zip(completions, records):
            got = self.extract(c)
            verdicts.append(Verdict(0.0, "no_answer") if got is None
                            else _verdict(got.strip() == str(_answer(r, self.field, "regex")).strip()))
        return verdicts


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(text: str) -> float | None:
    """The last number written in `text` (thousands commas allowed), or None."""
    found = NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


@VERIFIERS.register("number")
@dataclass
class Number:
    """The last number in the completion equals the field's (within `tolerance`)."""

    field: str = "answer"
    tolerance: float = 1e-6

    def verify(self, prompts, completions, records) -> list[Verdict]:
        verdicts = []
        for c, r in zip(completions, records):
            want = parse_number(_answer(r, self.field, "number"))
            if want is None:
                raise DataError(f"verifier number: field '{self.field}' holds no number: {r[self.field]!r}")
            got = parse_number(c)
            verdicts.append(Verdict(0.0, "no_answer") if got is None else _verdict(abs(got - want) <= self.tolerance))
        return verdicts


@VERIFIERS.register("function")
@dataclass
class Function:
    """A Python reward function named `module:attr`, called as TRL calls its reward functions:
    `fn(prompts=…, completions=…, **columns)` (each record field but prompt, completion and
    completion_ids a list) → a float or None per completion (None: no opinion, left out of the sum)."""

    entry_point: str = ""

    def __post_init__(self):
        import importlib

        module, _, attr = self.entry_point.partition(":")
        if not module or not attr:
            raise ConfigError(f"verifier function: entry_point must be 'module:function', not {self.entry_point!r}")
        try:
            fn = importlib.import_module(module)
            for part in attr.split("."):
                fn = getattr(fn, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"verifier function: cannot load {self.entry_point}: {exc}") from None
        if not callable(fn):
            raise ConfigError(f"verifier function: {self.entry_point} is not callable")
        self._fn: Callable = fn

    def verify(self, prompts, completions, records) -> list[Verdict]:
        keys = {k for r in records for k in r} - {"prompt", "completion", "completion_ids"}  # as TRL
        columns = {key: [r.get(key) for r in records] for key in keys}
        values = list(self._fn(prompts=list(prompts), completions=list(completions), **columns))
        if len(values) != len(completions):
            raise DataError(f"verifier function {self.entry_point}: {len(values)} rewards for "
                            f"{len(completions)} completions")
        return [Verdict(math.nan, "none") if v is None else Verdict(float(v), "scored") for v in values]


FENCE = re.compile(r"```(?:[\w+-]*)\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(text: str) -> str:
    """The first fenced code block of `text`, else all of it."""
    m = FENCE.search(text)
    return m.group(1) if m else text


@VERIFIERS.register("unit_tests")
@dataclass
class UnitTests:
    """The completion's code (its first fenced block, else all of it; after the prompt with
    `include_prompt`), then the record's tests, run as one program in `core/sandbox.py`:
    reward 1 if it exits 0 within `timeout` seconds and `memory_mb` of address space."""

    field: str = "tests"
    timeout: float = 5.0
    memory_mb: int = 512
    include_prompt: bool = False
    workers: int = 0  # programs run at a time; 0: the CPU count

    def warnings(self) -> list[str]:
        """What to tell the user before training: where the sandbox cannot cut programs off the network."""
        from llmctl.core.sandbox import NOT_ISOLATED, network_isolated

        return [] if network_isolated() else [NOT_ISOLATED]

    def verify(self, prompts, completions, records) -> list[Verdict]:
        from llmctl.core.sandbox import Limits, run_many

        programs = []
        for p, c, r in zip(prompts, completions, records):
            head = p if self.include_prompt and isinstance(p, str) else ""
            programs.append(f"{head}{extract_code(c)}\n\n{_answer(r, self.field, 'unit_tests')}\n")
        results = run_many(programs, Limits(timeout=self.timeout, memory_mb=self.memory_mb), self.workers or None)
        return [Verdict(1.0, "passed") if res.passed else Verdict(0.0, _failure(res)) for res in results]


def _failure(result) -> str:
    if result.status == "timeout":
        return "timeout"
    if "MemoryError" in result.stderr:
        return "memory"
    if result.returncode is not None and result.returncode < 0:
        return "killed"
    return "failed"


@dataclass
class Bound:
    """A configured verifier and its weight in the summed reward."""

    name: str
    weight: float
    verifier: Any


def build_verifiers(spec: dict[str, dict]) -> list[Bound]:
    """{name: settings} (settings may hold `weight`, default 1) → configured verifiers."""
    if not isinstance(spec, dict) or not spec:
        raise ConfigError("objective_args.verifiers: a mapping of verifier name → settings, e.g. {number: {}}")
    bound = []
    for name, settings in spec.items():
        settings = dict(settings or {})
        weight = float(settings.pop("weight", 1.0))
        cls = VERIFIERS.get(name)
        known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
        unknown = set(settings) - known if known is not None else set()
        if unknown:
            raise ConfigError(f"objective_args.verifiers.{name}: unknown setting(s) {', '.join(sorted(unknown))}; "
                              f"it takes {', '.join(sorted(known)) or 'none'} (and weight)")
        try:
            bound.append(Bound(name, weight, cls(**settings)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"objective_args.verifiers.{name}: {exc}") from None
    return bound


def score(verifiers: list[Bound], prompts: list, completions: list[str], records: list[dict]
          ) -> tuple[list[list[float]], list[list[str]]]:
    """Each completion's reward from each verifier ([N][V]) and the reasons."""
    columns = [b.verifier.verify(prompts, completions, records) for b in verifiers]
    rewards = [[v.reward for v in row] for row in zip(*columns)]
    reasons = [[v.reason for v in row] for row in zip(*columns)]
    return rewards, reasons


@VERIFIERS.register("reward_model")
@dataclass
class RewardModel:
    """A reward model's score of prompt + completion (TRL's reward model as a reward function):
    a checkpoint with a score head (`finetune --method reward`, or a transformers
    *ForSequenceClassification), read at the last token that is not padding."""

    path: str = ""
    batch_size: int = 16

    def __post_init__(self):
        from pathlib import Path

        if not self.path or not (Path(self.path) / "config.json").is_file():
            raise ConfigError(f"verifier reward_model: give path=CHECKPOINT, a reward model directory "
                              f"(not {self.path!r})")
        self._model = None

    def _load(self) -> None:
        from llmctl.core.model.io import load_model
        from llmctl.core.tokenizer import load_tokenizer

        model, cfg = load_model(self.path)
        if not cfg.num_labels:
            raise ConfigError(f"verifier reward_model: {self.path} has no score head (not a reward model)")
        self._model, self._tokenizer, self._pad = model.eval(), load_tokenizer(self.path), cfg.pad_token_id

    def verify(self, prompts, completions, records) -> list[Verdict]:
        import torch

        from llmctl.core.model.reward import sequence_scores

        if self._model is None:
            self._load()
        rows = self._tokenizer.encode_batch([f"{p}{c}" for p, c in zip(prompts, completions)])
        size = self.batch_size if self._pad is not None else 1  # without a pad id, one row at a time
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(rows), size):
                chunk = rows[start:start + size]
                width = max(map(len, chunk))
                ids = torch.tensor([r + [self._pad or 0] * (width - len(r)) for r in chunk])
                scores += sequence_scores(self._model, ids, self._pad)[:, 0].float().tolist()
        return [Verdict(s, "scored") for s in scores]
