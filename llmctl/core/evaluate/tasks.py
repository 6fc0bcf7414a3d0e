"""Evaluation tasks: the task-type registry, task YAML loading, documents, prompts, few-shot.

A task file is a YAML mapping with a `type` (a registered task type) and that type's keys:

    type: multiple_choice
    dataset: {path: questions.jsonl, fewshot_path: train.jsonl}   # or {builtin: word_order}, {benchmark: mmlu}
    prompt: "Question: {{ question }}\\nAnswer:"                   # Jinja, over a document's fields
    choices: options                                              # field names
    gold: label

A `benchmark` dataset reads a public benchmark's files from `--data` (`sources.py`).
`load_task("word_order")` reads `configs/eval/word_order.yaml`; a path reads that file.
Each task type is a dataclass (its schema) with `run(lm) -> {metric: value}`.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from llmctl.core.registry import Registry
from llmctl.core.report import SILENT, Reporter
from llmctl.errors import ConfigError, DataError, UsageError

_TASK_MODULES = ("choice", "generation", "perplexity", "code", "pairwise")  # modules that register the built-in types

Doc = tuple[str, dict]  # (where it came from, e.g. "data.jsonl:12"; the fields)


@dataclass
class Dataset:
    """Where a task's documents come from: a local JSONL file, a built-in generator or a benchmark."""

    path: str | None = None  # JSONL, one document per line; relative to the task file
    builtin: str | None = None  # a generator of `llmctl.core.evaluate.builtin`
    benchmark: str | None = None  # a benchmark of `llmctl.core.evaluate.sources`, read from --data
    fewshot_samples: list[dict] = field(default_factory=list)  # few-shot examples written in the task file
    size: int = 200  # built-in: number of documents
    seed: int = 0  # built-in: generation seed (the few-shot split uses seed + 1)
    fewshot_path: str | None = None  # JSONL of few-shot examples (a separate split)


@dataclass
class Task:
    """Fields shared by every task type."""

    name: str = ""
    description: str = ""  # text placed before the few-shot examples and the prompt (Jinja)
    base_dir: str = "."  # where relative paths are resolved (the task file's folder)

    report: ClassVar[Reporter] = SILENT  # progress and messages (the runner sets the caller's)

    def run(self, lm) -> dict[str, float]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Check what can be checked before a model is loaded (e.g. that the data is there)."""

    def uses(self, key: str) -> bool:
        """Whether a command-line override of config key `key` means anything to this task."""
        return key in {f.name for f in dataclasses.fields(self)}

    def log(self, **record: Any) -> None:
        """Keep one sample's record (prompt, answer, scores) when the runner collects them."""
        log = getattr(self, "samples_log", None)
        if log is not None:
            log.append(record)


TASK_TYPES: Registry[type] = Registry("eval task type", "llmctl.eval_tasks", base=Task)


@dataclass
class DocumentTask(Task):
    """A task over documents with a prompt template and optional few-shot examples."""

    dataset: Dataset = field(default_factory=Dataset)
    prompt: str = "{{ context }}"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = 0
    fewshot_seed: int = 1234
    fewshot_sampler: str = "random"  # or "first_n" (the first examples of the few-shot split)
    fewshot_target: str | None = None  # Jinja: a few-shot example's answer (default: its gold answer)
    group_by: str | None = None  # a field: few-shot examples from the document's group; metrics per group
    report_by: list[str] = field(default_factory=list)  # more fields to report metrics per value of
    limit: int | None = None
    data: list[str] = field(default_factory=list)  # --data: the benchmark's folder or file

    def __post_init__(self) -> None:
        ds = self.dataset
        if sum(x is not None for x in (ds.path, ds.builtin, ds.benchmark)) != 1:
            raise ConfigError(f"task {self.name}: config key 'dataset' needs exactly one of 'path', 'builtin' "
                              "or 'benchmark'")
        if ds.benchmark is not None:
            from llmctl.core.evaluate.sources import BENCHMARKS

            if ds.benchmark not in BENCHMARKS:
                raise ConfigError(f"task {self.name}: config key 'dataset.benchmark': unknown '{ds.benchmark}'; "
                                  f"choose from: {', '.join(BENCHMARKS.names())}")
        else:
            self.data = []  # --data given for other tasks of the run (see `uses`)
        if self.fewshot_sampler not in ("random", "first_n"):
            raise ConfigError(f"task {self.name}: config key 'fewshot_sampler': expected 'random' or 'first_n'")
        if self.dataset.builtin is not None:
            from llmctl.core.evaluate.builtin import BUILTIN_DATA

            if self.dataset.builtin not in BUILTIN_DATA:
                raise ConfigError(f"task {self.name}: config key 'dataset.builtin': unknown '{self.dataset.builtin}'; "
                                  f"choose from: {', '.join(BUILTIN_DATA.names())}")
        if self.num_fewshot < 0 or (self.limit is not None and self.limit < 1):
            raise ConfigError(f"task {self.name}: 'num_fewshot' must be ≥ 0 and 'limit' ≥ 1")
        for key in ("prompt", "description") + (("fewshot_target",) if self.fewshot_target else ()):
            self.template(key)  # fail early on a syntax error

    def uses(self, key: str) -> bool:
        return self.dataset.benchmark is not None if key == "data" else super().uses(key)

    def prepare(self) -> None:
        self.documents()
        if self.num_fewshot:
            self.fewshot_pool([])

    # -- documents --------------------------------------------------------------------------
    def documents(self) -> list[Doc]:
        """The evaluation documents (first `limit` of them); DataError when there are none."""
        ds = self.dataset
        if ds.builtin is not None:
            from llmctl.core.evaluate.builtin import generate

            docs = [(f"builtin:{ds.builtin}:{i + 1}", d) for i, d in enumerate(generate(ds.builtin, ds.size, ds.seed))]
        elif ds.benchmark is not None:
            from llmctl.core.evaluate.sources import BENCHMARKS

            docs = BENCHMARKS.get(ds.benchmark).documents(self.name, self.data)
        else:
            docs = read_jsonl(self.resolve(ds.path))
        docs = docs[: self.limit] if self.limit else docs
        if not docs:
            raise DataError(f"task {self.name}: the dataset is empty")
        return docs

    def fewshot_pool(self, docs: list[Doc]) -> list[Doc]:
        ds = self.dataset
        if ds.fewshot_samples:
            return [(f"task {self.name}: fewshot_samples[{i}]", d) for i, d in enumerate(ds.fewshot_samples)]
        if ds.fewshot_path is not None:
            return read_jsonl(self.resolve(ds.fewshot_path))
        if ds.benchmark is not None:
            from llmctl.core.evaluate.sources import BENCHMARKS

            bench = BENCHMARKS.get(ds.benchmark)
            return bench.documents(self.name, self.data, fewshot=True) if bench.fewshot_splits else docs
        if ds.builtin is not None:
            from llmctl.core.evaluate.builtin import generate

            return [(f"builtin:{ds.builtin}:fewshot:{i + 1}", d) for i, d in
                    enumerate(generate(ds.builtin, max(self.num_fewshot * 8, 64), ds.seed + 1))]
        return docs  # no separate split: sample from the others (as lm-eval)

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        if not p.is_absolute() and (Path(self.base_dir) / p).exists():
            p = Path(self.base_dir) / p
        if not p.is_file():
            raise DataError(f"task {self.name}: data file {path} not found")
        return p

    # -- prompts ----------------------------------------------------------------------------
    def template(self, key: str):
        """The Jinja template in config key `key` (ConfigError naming the key if invalid)."""
        from jinja2 import TemplateSyntaxError

        try:
            return _compile(getattr(self, key))
        except TemplateSyntaxError as exc:
            raise ConfigError(f"task {self.name}: config key '{key}': invalid template: {exc}") from None

    def render(self, key: str, doc: Doc, **extra: Any) -> str:
        from jinja2 import UndefinedError
        from jinja2.exceptions import SecurityError

        where, fields = doc
        try:
            return self.template(key).render(**fields, doc=fields, **extra)
        except UndefinedError as exc:
            raise DataError(f"{where}: template '{key}': {exc.message}") from None
        except SecurityError as exc:
            raise ConfigError(f"task {self.name}: config key '{key}': the template tried an unsafe operation "
                              f"({exc}); templates may only format the document's fields") from None

    def example_target(self, doc: Doc) -> str:
        """The answer shown after a few-shot example's prompt."""
        raise NotImplementedError

    def contexts(self, docs: list[Doc]) -> list[str]:
        """Description + `num_fewshot` examples + the prompt, for every document."""
        return [prefix + self.render("prompt", d) for prefix, d in zip(self.prefixes(docs), docs)]

    def prefixes(self, docs: list[Doc]) -> list[str]:
        """What precedes each document's prompt: the description and the few-shot examples
        (seeded draws, or the first ones; from the document's group with `group_by`), as lm-eval."""
        if not self.num_fewshot:
            return [self.render("description", d) for d in docs]
        pool = self.fewshot_pool(docs)
        same = pool is docs  # no separate split: draw one more and drop the document itself
        rng = random.Random(self.fewshot_seed)
        out = []
        for doc in docs:
            group = [s for s in pool if s[1].get(self.group_by) == doc[1].get(self.group_by)] if self.group_by else pool
            if len(group) < self.num_fewshot + same:
                raise DataError(f"task {self.name}: --num-fewshot {self.num_fewshot} needs more few-shot examples "
                                f"than the {len(group)} available" + (f" for {self.group_by} "
                                f"{doc[1].get(self.group_by)!r}" if self.group_by else ""))
            n = self.num_fewshot + same
            drawn = group[:n] if self.fewshot_sampler == "first_n" else rng.sample(group, n)
            shots = [s for s in drawn if s is not doc][: self.num_fewshot]
            examples = [self.render("prompt", s) + self.target_delimiter + self.shot_target(s) for s in shots]
            out.append(self.render("description", doc) + "".join(e + self.fewshot_delimiter for e in examples))
        return out

    def shot_target(self, doc: Doc) -> str:
        return self.render("fewshot_target", doc) if self.fewshot_target else self.example_target(doc)

    def summarize(self, scores: dict[str, list[float]], docs: list[Doc]) -> dict[str, float]:
        """Means and stderrs of per-document scores, per `group_by` group (and macro) and per
        value of each `report_by` field."""
        from llmctl.core.evaluate.metrics import aggregate

        def labels(key: str) -> list[str]:
            return [str(field_value(d, key)) for d in docs]

        groups = labels(self.group_by) if self.group_by else None
        return aggregate(scores, groups, [labels(key) for key in self.report_by])


@functools.lru_cache(maxsize=256)
def _compile(source: str):
    """A task's prompt template, compiled in jinja2's sandbox: task files are data, not code."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True).from_string(source)


def read_jsonl(path: Path) -> list[Doc]:
    """Documents of a JSONL file (blank lines skipped); DataError naming the bad line."""
    from llmctl.core.data.corpus import iter_jsonl

    return [(f"{path}:{number}", doc) for number, doc in iter_jsonl(path)]


def field_value(doc: Doc, key: str) -> Any:
    """A document field; DataError naming the line when it is missing."""
    where, fields = doc
    if key not in fields:
        raise DataError(f"{where}: missing field '{key}' (have: {', '.join(fields) or 'none'})")
    return fields[key]


# ---------------------------------------------------------------------------------- loading


def load_tasks(specs: list[str], overrides: dict[str, Any] | None = None) -> list[Task]:
    """Tasks from preset names (`configs/eval/NAME.yaml`) or YAML paths, plus overrides.

    Overrides are {key: value} from command-line flags (None = not given), applied to every
    task whose type has that key; a flag no task uses is a UsageError.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    tasks = [load_task(spec, given) for spec in specs]
    for key in given:
        if not any(t.uses(key) for t in tasks):
            raise UsageError(f"--{key.replace('_', '-')} does not apply to task {', '.join(t.name for t in tasks)}")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise UsageError(f"--task: a task is given twice ({', '.join(names)})")
    return tasks


def load_task(spec: str, overrides: dict[str, Any] | None = None) -> Task:
    """One task from a preset name or YAML path; `overrides` set the keys its type has."""
    import importlib

    from llmctl.config import build, preset_path, read_yaml

    for module in _TASK_MODULES:
        importlib.import_module(f"llmctl.core.evaluate.{module}")
    path = preset_path(spec, "eval")
    raw = read_yaml(path)
    type_name = raw.pop("type", None)
    if type_name is None:
        raise ConfigError(f"{path}: missing config key 'type' (one of: {', '.join(TASK_TYPES.names())})")
    if type_name not in TASK_TYPES:
        from llmctl.core.registry import did_you_mean

        raise ConfigError(f"{raw.origins.get('type', path)}: config key 'type': unknown task type '{type_name}'"
                          f"{did_you_mean(type_name, TASK_TYPES.names())}; choose from: {', '.join(TASK_TYPES.names())}")
    schema = TASK_TYPES.get(type_name)
    keys = {f.name for f in dataclasses.fields(schema)}
    for key, value in (overrides or {}).items():
        if key in keys and value is not None:
            raw[key] = value
            raw.origins[key] = "--" + key.replace("_", "-")
    raw.setdefault("name", path.stem)
    raw["base_dir"] = str(path.parent)
    return build(schema, raw, raw.origins)
