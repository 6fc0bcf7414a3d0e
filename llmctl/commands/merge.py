"""`llmctl merge`: combine checkpoints tensor by tensor (mergekit recipes, or a short form).

    llmctl merge --config MERGE.yaml -o OUT                     # a mergekit recipe, unchanged
    llmctl merge A B --method slerp --t 0.5 -o OUT              # the short form
    llmctl merge BASE FT1 FT2 --method ties --density 0.5 -o OUT
    llmctl merge --config SOUP.yaml -o OUT                      # merge_method: greedy_soup (+ evaluation:)
    llmctl merge --evolve SEARCH.yaml -o OUT                    # evolutionary search of recipe values
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmctl.options import option

SHORT = "Short form"


def merge(
    models: Annotated[Optional[list[str]], typer.Argument(help="Short form: the checkpoints to merge (the first is the base when the method needs one).", show_default=False)] = None,
    config: Annotated[Optional[Path], option("--config", "-c", help="A mergekit merge recipe (YAML), or a preset under configs/merge.")] = None,
    output: Annotated[Optional[Path], option("--output", "-o", help="Output checkpoint directory (required).")] = None,
    method: Annotated[str, option("--method", "-m", help="Merge method (linear, slerp, ties, dare_ties, …; `llmctl merge --list`).", panel=SHORT)] = "linear",
    base: Annotated[Optional[str], option("--base", help="Base model (default: the first model, for methods that need one).", panel=SHORT)] = None,
    t: Annotated[Optional[float], option("--t", help="Interpolation factor (slerp).", panel=SHORT)] = None,
    weight: Annotated[Optional[list[float]], option("--weight", "-w", help="Weight of each non-base model (repeatable; one value for all).", panel=SHORT)] = None,
    density: Annotated[Optional[float], option("--density", help="Fraction of each task vector kept (ties, dare, breadcrumbs, della).", panel=SHORT)] = None,
    param: Annotated[Optional[list[str]], option("--param", "-p", help="Another method parameter as key=value (repeatable), e.g. normalize=false.", panel=SHORT)] = None,
    evolve: Annotated[Optional[Path], option("--evolve", help="Search merge parameters against an eval task (SEARCH.yaml: recipe, search, evaluation, budget).")] = None,
    list_methods: Annotated[bool, option("--list", help="List the merge methods and their parameters, then exit.")] = False,
) -> None:
    """Merge checkpoints: linear (soups), slerp, nuslerp, task arithmetic, ties, dare, breadcrumbs, della, model_stock, passthrough."""
    from llmctl.console import REPORTER, emit, info
    from llmctl.errors import UsageError
    from llmctl.runtime import options

    if list_methods:
        return _list()
    if output is None:
        raise UsageError("missing option --output / -o (the merged checkpoint's directory)")
    from llmctl.config import preset_path
    from llmctl.core.merge import merge as run_merge
    from llmctl.core.merge.recipe import read_yaml
    from llmctl.core.merge.search import SEARCHES
    from llmctl.core.outputs import claim_output
    from llmctl.options import human_bytes

    if evolve and config is not None:
        raise UsageError("--evolve and --config exclude each other (the search file holds the recipe)")
    short = {"--method": method != "linear", "--base": base, "--t": t, "--weight": weight, "--density": density,
             "--param": param, "MODELS": models}
    given = [flag for flag, value in short.items() if value]
    if (config or evolve) and given:
        raise UsageError(f"{'--config' if config else '--evolve'} and the short form ({', '.join(given)}) "
                         "exclude each other")
    config = preset_path(str(config), "merge") if config is not None else None
    if evolve or config:
        raw = read_yaml(evolve or config)
        name = "evolve" if evolve else raw.get("merge_method") if isinstance(raw, dict) else None
        if name in SEARCHES:
            return _search(name, raw, evolve or config, output)
    recipe = _recipe(models, config, method, base, t, weight, density, param)

    if options.dtype != "auto":
        recipe.out_dtype = options.dtype
    with claim_output(output, "merge", force=options.force, inputs=recipe.models()):
        result = run_merge(recipe, output, force=options.force, seed=options.seed or 0, report=REPORTER)
    emit(result, lambda: info(f"merged {len(result['models'])} models ({result['method']}, {result['tensors']} tensors, "
                              f"{human_bytes(result['bytes'])}) in {result['seconds']:.1f}s → {output}"))


def _search(name: str, raw: dict, path: Path, output: Path) -> None:
    from llmctl.console import REPORTER, emit, info
    from llmctl.core.merge.search import SEARCHES, Objective
    from llmctl.core.outputs import claim_output
    from llmctl.runtime import options, resolve_device

    objective = Objective.parse(raw.get("evaluation") if isinstance(raw, dict) else None, str(path),
                                relative_to=path.parent, device=resolve_device())
    with claim_output(output, "merge", force=options.force, inputs=[path]):
        result = SEARCHES.get(name)(raw, objective, output, force=options.force, report=REPORTER, where=str(path),
                                    relative_to=path.parent)
    emit(result, lambda: info(f"{name}: best score {result['score']:.4g} after {objective.evaluations} evaluations "
                              f"→ {output}"))


def _recipe(models, config, method, base, t, weight, density, param):
    from llmctl.core.merge.recipe import load_recipe, parse_recipe, short_recipe
    from llmctl.errors import UsageError

    if config is not None:
        return load_recipe(config)
    if not models:
        raise UsageError("give a recipe (--config MERGE.yaml) or the models to merge (llmctl merge A B --method …)")
    params = dict(_pair(p) for p in param or [])
    _check_params(method, params, t=t, weight=weight, density=density)
    if t is not None:
        params["t"] = t
    raw = short_recipe(models, method, base=base, weights=weight or [], params=params,
                       per_model={"density": density} if density is not None else None)
    return parse_recipe(raw, "short form")


def _check_params(method: str, params: dict, *, t, weight, density) -> None:
    """A short-form parameter the method does not declare is a usage error, not silently dropped
    (a mergekit recipe keeps mergekit's rule: undeclared parameters are ignored)."""
    from llmctl.core.merge.methods import METHODS
    from llmctl.core.registry import did_you_mean
    from llmctl.errors import UsageError

    spec = METHODS.get(method)
    declared = [p.name for p in spec.params]
    takes = f"{method} takes " + (", ".join(declared) if declared else "no parameters")
    for flag, name, value in (("--t", "t", t), ("--weight", "weight", weight), ("--density", "density", density)):
        if value is not None and value != [] and name not in declared:
            raise UsageError(f"{flag}: merge method {method} has no parameter '{name}' ({takes})")
    for name in params:
        if name == "weight" and name in declared:  # the per-model weights (default 1) would override it
            raise UsageError("--param weight: give the weights as --weight / -w")
        if name not in declared:
            raise UsageError(f"--param {name}: merge method {method} has no parameter '{name}'"
                             f"{did_you_mean(name, declared)} ({takes})")


def _pair(text: str):
    import yaml

    from llmctl.errors import UsageError

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--param {text!r}: expected key=value")
    return key.strip(), yaml.safe_load(value)


def _list() -> None:
    from llmctl.console import console, emit, table
    from llmctl.core.merge import METHODS

    rows, data = [], {}
    for name, m in METHODS.items():
        params = [f"{p.name}{'*' if p.per_model else ''}" + ("" if p.required else f"={p.default}") for p in m.params]
        rows.append([name, m.base, ", ".join(params)])
        data[name] = {"base": m.base, "random": m.random, "parameters": [
            {"name": p.name, "type": p.type.__name__, "per_model": p.per_model,
             "default": None if p.required else p.default, "required": p.required} for p in m.params]}
    emit(data, lambda: console.print(table("merge methods (* = per model)", ["method", "base", "parameters"], rows)))
