"""`llmctl config`: inspect presets and the resolved configuration of a recipe."""

from typing import Annotated, Optional

import typer

from llmctl.console import console, emit, table
from llmctl.errors import ConfigError

app = typer.Typer(help="Inspect presets and resolved configurations.", no_args_is_help=True)


def _split(recipe: str) -> tuple[str, str]:
    """'train/tiny' → ('train', 'tiny'); a bare preset name is looked up in every kind."""
    from pathlib import Path

    from llmctl.config import configs_dir, list_presets

    if recipe.endswith((".yaml", ".yml")) and Path(recipe).is_file():
        return "", recipe
    if "/" in recipe and not Path(recipe).exists():
        kind, _, name = recipe.partition("/")
        return kind, name
    kinds = sorted(d.name for d in configs_dir().iterdir() if d.is_dir() and recipe in list_presets(d.name))
    if len(kinds) > 1:
        raise ConfigError(f"preset '{recipe}' exists for {', '.join(kinds)}; say which, e.g. {kinds[0]}/{recipe}")
    if not kinds:
        from llmctl.core.registry import did_you_mean

        every = sorted(f"{d.name}/{p}" for d in configs_dir().iterdir() if d.is_dir() for p in list_presets(d.name))
        names = [e.split("/", 1)[1] for e in every]
        raise ConfigError(f"unknown preset '{recipe}'{did_you_mean(recipe, names)}; available: {', '.join(every) or 'none'}")
    return kinds[0], recipe


@app.command("show")
def show(
    recipe: Annotated[str, typer.Argument(help="A preset (e.g. model/nano, train/tiny) or a YAML file.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.sub=value overrides.")] = None,
) -> None:
    """Print the resolved YAML of a preset or file with overrides applied (validated when typed)."""
    import yaml

    from llmctl import config

    kind, name = _split(recipe)
    raw = config.resolve(name, overrides or [], kind)
    schema = config.schema_for(kind)
    resolved = config.to_dict(config.build(schema, raw, raw.origins)) if schema else dict(raw)
    emit(resolved, lambda: typer.echo(yaml.safe_dump(resolved, sort_keys=False), nl=False))


@app.command("list")
def list_(kind: Annotated[Optional[str], typer.Argument(help="Only this kind (model, train, …).")] = None) -> None:
    """List the shipped presets by kind."""
    from llmctl.config import configs_dir, list_presets

    kinds = sorted(d.name for d in configs_dir().iterdir() if d.is_dir() and not d.name.startswith("_"))
    if kind:
        if kind not in kinds:
            raise ConfigError(f"unknown config kind '{kind}'; available: {', '.join(kinds)}")
        kinds = [kind]
    found = {k: list_presets(k) for k in kinds}
    emit(found, lambda: console.print(table("presets", ["kind", "presets"], [[k, ", ".join(v)] for k, v in found.items()])))
