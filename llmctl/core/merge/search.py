"""Merges chosen by an eval score: greedy model soups and an evolutionary parameter search.

    objective = Objective.parse({"task": "perplexity", "data": ["val.txt"]}, device="cpu")
    greedy_soup(recipe_dict, objective, "out")       # keep each candidate only if it helps
    evolve(search_dict, objective, "out")            # seeded (1+λ) evolution strategy

Both write candidates to a temporary directory beside the output, score them with the eval
core (`evaluate`, nothing recorded), and finish with one ordinary merge into the output whose
lineage records the search.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmctl.core.merge.recipe import model_resolver, parse_recipe, read_yaml
from llmctl.core.merge.run import merge, scratch
from llmctl.core.outputs import check_output
from llmctl.core.registry import Registry
from llmctl.core.report import SILENT, Reporter
from llmctl.errors import ConfigError

SEARCHES: Registry[Callable[..., dict]] = Registry("merge search")
LOWER_IS_BETTER = ("perplexity", "nll", "loss", "bits_per_byte", "error")


@dataclass
class Objective:
    """An eval task whose `metric` scores a checkpoint (its first metric when not named);
    metrics named like perplexity or loss are minimised, others maximised."""

    task: str
    data: list[str] | None = None
    metric: str | None = None
    limit: int | None = None
    device: Any = "cpu"
    dtype: Any = None
    evaluations: int = field(default=0, init=False)

    @classmethod
    def parse(cls, spec: Any, where: str, relative_to=None, **kw) -> "Objective":
        """From a recipe's `evaluation:` block; data paths as for models (see model_resolver)."""
        if not isinstance(spec, dict) or "task" not in spec:
            raise ConfigError(f"{where}: evaluation: expected a mapping with a 'task'")
        unknown = set(spec) - {"task", "data", "metric", "limit"}
        if unknown:
            raise ConfigError(f"{where}: evaluation: unknown key '{sorted(unknown)[0]}'")
        data = spec.get("data")
        data = [data] if isinstance(data, str) else data
        if data is not None:
            data = [model_resolver(f"{where}: evaluation.data", relative_to)(d) for d in data]
        return cls(str(spec["task"]), data, spec.get("metric"),
                   spec.get("limit"), **kw)

    def score(self, checkpoint: str | os.PathLike) -> float:
        """The metric oriented so that higher is better."""
        from llmctl.core.evaluate.runner import evaluate
        from llmctl.core.evaluate.tasks import load_tasks

        tasks = load_tasks([self.task], {"data": self.data, "limit": self.limit})
        (metrics,) = evaluate([checkpoint], tasks, device=self.device, dtype=self.dtype, record=False)[
            str(checkpoint)].values()
        name = self.metric or next(iter(metrics))
        if name not in metrics:
            raise ConfigError(f"evaluation: task {self.task} has no metric '{name}' (it reports {', '.join(metrics)})")
        self.evaluations += 1
        value = float(metrics[name])
        return -value if any(word in name for word in LOWER_IS_BETTER) else value


@SEARCHES.register("greedy_soup")
def greedy_soup(raw: dict, objective: Objective, out: str | os.PathLike, *, force: bool = False,
                report: Reporter = SILENT, where: str = "recipe", relative_to=None) -> dict:
    """Wortsman et al.'s greedy soup: candidates sorted by their own score; each joins the
    uniform average only if the soup's score improves. `raw` lists the candidates under
    `models`; the result is a `linear` merge of the kept ones."""
    unknown = set(raw) - {"merge_method", "models", "evaluation", "dtype", "out_dtype", "tokenizer_source", "tokenizer"}
    if unknown:
        raise ConfigError(f"{where}: greedy_soup: unknown key '{sorted(unknown)[0]}'")
    resolve = model_resolver(f"{where}: models", relative_to)
    candidates = [resolve(m) for m in raw.get("models") or []]
    if len(candidates) < 2:
        raise ConfigError(f"{where}: greedy_soup needs at least two models")
    check_output(out, "merge", force=force, inputs=candidates)  # not only the kept ones: before any scoring
    extra = {k: v for k, v in raw.items() if k in ("dtype", "out_dtype", "tokenizer_source", "tokenizer")}

    def soup(members):
        return {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in members],
                **extra}

    with report.progress("greedy soup", total=2 * len(candidates) - 1) as bar, scratch(out) as tmp:
        scores = {}
        for model in candidates:
            scores[model] = objective.score(model)
            bar.advance()
        ranked = sorted(candidates, key=scores.__getitem__, reverse=True)
        kept, best, trials = [ranked[0]], scores[ranked[0]], []
        for i, model in enumerate(ranked[1:]):
            trial = Path(tmp) / f"soup-{i}"
            merge(parse_recipe(soup(kept + [model]), where, relative_to), trial)
            score = objective.score(trial)
            trials.append({"model": model, "score": score, "kept": score > best})
            if score > best:
                kept, best = kept + [model], score
            shutil.rmtree(trial)
            bar.advance()
            bar.update(best=f"{best:.4g}")
    search = {"search": "greedy_soup", "individual_scores": scores, "trials": trials, "kept": kept, "score": best,
              "evaluation": raw.get("evaluation")}
    result = merge(parse_recipe(soup(kept), where, relative_to), out, force=force, record=search)
    return {**result, **search}


@SEARCHES.register("evolve")
def evolve(spec: dict, objective: Objective, out: str | os.PathLike, *, force: bool = False,
           report: Reporter = SILENT, where: str = "search", relative_to=None) -> dict:
    """A seeded (1+λ) evolution strategy over recipe values: `search` maps dotted paths of the
    recipe (`parameters.t`, `models.1.parameters.weight`) to [low, high]; each generation
    samples `population` Gaussian steps of `sigma` × range around the best point (step size
    ×1.5 after an improvement, ×0.7 otherwise) until `budget` evaluations are spent."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping (recipe, search, evaluation, budget, …)")
    unknown = set(spec) - {"recipe", "search", "evaluation", "budget", "population", "sigma", "seed"}
    if unknown:
        raise ConfigError(f"{where}: unknown key '{sorted(unknown)[0]}'")
    recipe, space = spec.get("recipe"), spec.get("search")
    if isinstance(recipe, str):  # a recipe file beside the search file
        recipe = read_yaml(model_resolver(where, relative_to)(recipe))
    if not isinstance(recipe, dict) or not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}: expected 'recipe' (a merge recipe) and 'search' ({{path: [low, high]}})")
    bounds = {}
    for path, rng in space.items():
        if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, (int, float)) for v in rng)
                and rng[0] < rng[1]):
            raise ConfigError(f"{where}: search.{path}: expected [low, high], found {rng!r}")
        _set(copy.deepcopy(recipe), path, 0.0, where)  # the path exists
        bounds[path] = (float(rng[0]), float(rng[1]))
    budget, population = int(spec.get("budget", 16)), int(spec.get("population", 4))
    sigma, rng = float(spec.get("sigma", 0.25)), random.Random(spec.get("seed", 0))
    if budget < 1 or population < 1:
        raise ConfigError(f"{where}: budget and population must be >= 1")
    check_output(out, "merge", force=force, inputs=parse_recipe(recipe, where, relative_to).models())

    def build(point):
        r = copy.deepcopy(recipe)
        for path, value in point.items():
            _set(r, path, value, where)
        return r

    history = []
    with report.progress("evolve", total=budget) as bar, scratch(out) as tmp:
        def score(point):
            trial = Path(tmp) / f"trial-{len(history)}"
            merge(parse_recipe(build(point), where, relative_to), trial, seed=int(spec.get("seed", 0)))
            value = objective.score(trial)
            shutil.rmtree(trial)
            history.append({"point": point, "score": value})
            bar.advance()
            return value

        best = {p: _start(recipe, p, lo, hi) for p, (lo, hi) in bounds.items()}
        best_score = score(best)
        bar.update(best=f"{best_score:.4g}")
        while len(history) < budget:
            offspring = []
            for _ in range(min(population, budget - len(history))):
                point = {p: min(hi, max(lo, best[p] + rng.gauss(0, sigma) * (hi - lo))) for p, (lo, hi) in bounds.items()}
                offspring.append((score(point), point))
            top_score, top = max(offspring, key=lambda x: x[0])
            improved = top_score > best_score
            if improved:
                best, best_score = top, top_score
            sigma *= 1.5 if improved else 0.7
            bar.update(best=f"{best_score:.4g}")
    final = build(best)
    search = {"search": "evolve", "best": best, "score": best_score, "evaluations": len(history),
              "history": history, "evaluation": spec.get("evaluation")}
    result = merge(parse_recipe(final, where, relative_to), out, force=force, seed=int(spec.get("seed", 0)), record=search)
    return {**result, "best": best, "score": best_score, "evaluations": len(history), "recipe": final}


def _start(recipe: dict, path: str, lo: float, hi: float) -> float:
    """The recipe's own value at `path` when it is a number in range, else the middle."""
    value = recipe
    for key in path.split("."):
        value = value[int(key)] if isinstance(value, list) else value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) and lo <= value <= hi else (lo + hi) / 2


def _set(recipe: Any, path: str, value: float, where: str) -> None:
    *parents, last = path.split(".")
    node = recipe
    try:
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    except (KeyError, IndexError, ValueError, TypeError, AttributeError):
        raise ConfigError(f"{where}: search path '{path}' does not name a place in the recipe") from None

