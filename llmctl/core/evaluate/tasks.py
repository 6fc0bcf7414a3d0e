"""Evaluation tasks: the task-type registry, task YAML loading, documents, prompts, few-shot.

A task file is a YAML mapping with a `type` (a registered task type) and that type's keys:

    type: multiple_choice
    dataset: {path: questions.jsonl, fewshot_path: train.jsonl}   # or {builtin: word_order}
    prompt: "Question: {{ question }}\\nAnswer:"                   # Jinja, over a document's fields
    choices: options                                              # field names
    gold: label

`load_task("word_order")` reads `configs/eval/word_order.yaml`; a path reads that file.
Each task type is a dataclass (its schema) with `run(lm) -> {metric: value}`.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.core.registry import Registry
from llmctl.errors import ConfigError, DataError, UsageError

TASK_TYPES: Registry[type] = Registry("eval task type", "llmctl.eval_tasks")
_TASK_MODULES = ("choice", "generation", "perplexity")  # modules that register the built-in types

Doc = tuple[str, dict]  # (where it came from, e.g. "data.jsonl:12"; the fields)


@dataclass
class Dataset:
    """Where a task's documents come from: a local JSONL file or a built-in generator."""

    path: str | None = None  # JSONL, one document per line; relative to the task file
    builtin: str | None = None  # a generator of `llmctl.core.evaluate.builtin`
    size: int = 200  # built-in: number of documents
    seed: int = 0  # built-in: generation seed (the few-shot split uses seed + 1)
    fewshot_path: str | None = None  # JSONL of few-shot examples (a separate split)


@dataclass
class Task:
    """Fields shared by every task type."""

    name: str = ""
    description: str = ""  # text placed before the few-shot examples and the prompt
    base_dir: str = "."  # where relative paths are resolved (the task file's folder)

    def run(self, lm) -> dict[str, float]:
        raise NotImplementedError


@dataclass
class DocumentTask(Task):
    """A task over documents with a prompt template and optional few-shot examples."""

    dataset: Dataset = field(default_factory=Dataset)
    prompt: str = "{{ context }}"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = 0
    fewshot_seed: int = 1234
    limit: int | None = None

    def __post_init__(self) -> None:
        if (self.dataset.path is None) == (self.dataset.builtin is None):
            raise ConfigError(f"task {self.name}: config key 'dataset' needs exactly one of 'path' or 'builtin'")
        if self.dataset.builtin is not None:
            from llmctl.core.evaluate.builtin import BUILTIN_DATA

            if self.dataset.builtin not in BUILTIN_DATA:
                raise ConfigError(f"task {self.name}: config key 'dataset.builtin': unknown '{self.dataset.builtin}'; "
                                  f"choose from: {', '.join(BUILTIN_DATA.names())}")
        if self.num_fewshot < 0 or (self.limit is not None and self.limit < 1):
            raise ConfigError(f"task {self.name}: 'num_fewshot' must be ≥ 0 and 'limit' ≥ 1")
        self.template("prompt")  # fail early on a syntax error

    # -- documents --------------------------------------------------------------------------
    def documents(self) -> list[Doc]:
        """The evaluation documents (first `limit` of them); DataError when there are none."""
        ds = self.dataset
        if ds.builtin is not None:
            from llmctl.core.evaluate.builtin import generate

            docs = [(f"builtin:{ds.builtin}:{i + 1}", d) for i, d in enumerate(generate(ds.builtin, ds.size, ds.seed))]
        else:
            docs = read_jsonl(self.resolve(ds.path))
        docs = docs[: self.limit] if self.limit else docs
        if not docs:
            raise DataError(f"task {self.name}: the dataset is empty")
        return docs

    def fewshot_pool(self, docs: list[Doc]) -> list[Doc]:
        ds = self.dataset
        if ds.fewshot_path is not None:
            return read_jsonl(self.resolve(ds.fewshot_path))
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

        where, fields = doc
        try:
            return self.template(key).render(**fields, doc=fields, **extra)
        except UndefinedError as exc:
            raise DataError(f"{where}: template '{key}': {exc.message}") from None

    def example_target(self, doc: Doc) -> str:
        """The answer shown after a few-shot example's prompt."""
        raise NotImplementedError

    def contexts(self, docs: list[Doc]) -> list[str]:
        """Description + `num_fewshot` seeded examples + the prompt, for every document."""
        prompts = [self.render("prompt", d) for d in docs]
        if not self.num_fewshot:
            return [self.description + p for p in prompts]
        pool = self.fewshot_pool(docs)
        if len(pool) < self.num_fewshot + (pool is docs):
            raise DataError(f"task {self.name}: --num-fewshot {self.num_fewshot} needs more few-shot examples "
                            f"than the {len(pool)} available")
        rng = random.Random(self.fewshot_seed)
        out = []
        for doc, prompt in zip(docs, prompts):
            drawn = rng.sample(pool, min(self.num_fewshot + 1, len(pool)))
            shots = [s for s in drawn if s is not doc][: self.num_fewshot]
            examples = [self.render("prompt", s) + self.target_delimiter + self.example_target(s) for s in shots]
            out.append(self.description + self.fewshot_delimiter.join([*examples, prompt]))
        return out


@functools.lru_cache(maxsize=256)
def _compile(source: str):
    from jinja2 import Environment, StrictUndefined

    return Environment(undefined=StrictUndefined, keep_trailing_newline=True).from_string(source)


def read_jsonl(path: Path) -> list[Doc]:
    """Documents of a JSONL file (blank lines skipped); DataError naming the bad line."""
    from llmctl.core.data import iter_jsonl

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
        if not any(key in {f.name for f in dataclasses.fields(t)} for t in tasks):
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
