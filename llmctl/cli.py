"""The `llmctl` command host: global options, plugin commands, errors → exit codes.

Every command comes from the `llmctl.commands` entry-point group (see `llmctl.plugins`). Each
command is wrapped once, here, so that it accepts the common options after its name as well
as before it, and so that an `LlmctlError` becomes one line on stderr and its exit code.
Importing this module must stay light: no torch, no numpy.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Annotated, Any, Callable, Optional

import typer

from llmctl import __version__
from llmctl.errors import LlmctlError
from llmctl.runtime import DEVICES, DTYPES, options, tune_allocator

GLOBAL_PANEL = "Global options"
_DEBUG_HINT = "re-run with --debug for the traceback"


def _opt(*names: str, help: str, **kw: Any) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=GLOBAL_PANEL, **kw)


# The options every command accepts after its name; keys are the `options` fields they set.
COMMON_OPTIONS: dict[str, tuple[Any, Any]] = {
    "json": (Annotated[bool, _opt("--json", help="Machine-readable output on stdout.")], False),
    "quiet": (Annotated[bool, _opt("--quiet", "-q", help="No progress bars or messages.")], False),
    "device": (Annotated[Optional[str], _opt("--device", help=f"One of {', '.join(DEVICES)}.")], None),
    "dtype": (Annotated[Optional[str], _opt("--dtype", help=f"One of {', '.join(DTYPES)}.")], None),
    "seed": (Annotated[Optional[int], _opt("--seed", help="Random seed.")], None),
    "force": (Annotated[bool, _opt("--force", "-f", help="Replace an llmctl output of the same kind.")], False),
    "debug": (Annotated[bool, _opt("--debug", help="Show tracebacks on errors.")], False),
}
_PARAM_PREFIX = "_llmctl_"


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Run `fn`, turning failures into one line on stderr and the right exit code."""
    from rich.markup import escape

    from llmctl.console import console

    try:
        return fn()
    except (typer.Exit, typer.Abort):
        raise
    except LlmctlError as exc:
        if options.debug:
            console.print_exception()
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        raise typer.Exit(_broken_pipe()) from None
    except OSError as exc:  # the file system said no: name the path and the reason, no hint of a bug
        if options.debug:
            console.print_exception()
        where = f"{exc.filename}: " if exc.filename else ""
        console.print(f"[red]error:[/red] {escape(where + (exc.strerror or str(exc)))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    except Exception as exc:
        if options.debug:
            console.print_exception()
            raise typer.Exit(1) from None
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        console.print(f"[red]error:[/red] {type(exc).__name__}: {escape(message)} ({_DEBUG_HINT})", soft_wrap=True)
        raise typer.Exit(1) from None


def _broken_pipe() -> int:
    """The reader of stdout went away (`llmctl … | head -1`): stop quietly, as Unix tools do."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


def with_common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command function the common options and the error guard."""
    import typing

    hints = typing.get_type_hints(fn, include_extras=True)  # resolved in fn's own module
    sig = inspect.signature(fn)
    params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()]
    tail = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    head = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [
        inspect.Parameter(_PARAM_PREFIX + key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for key, (annotation, default) in COMMON_OPTIONS.items()
        if key not in sig.parameters
    ]

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        given = {k[len(_PARAM_PREFIX):]: kwargs.pop(k) for k in list(kwargs) if k.startswith(_PARAM_PREFIX)}
        options.update(**given)
        run_guarded(lambda: fn(*args, **kwargs))  # what a command returns is not its exit code

    new_params = head + extra + tail
    command.__signature__ = sig.replace(parameters=new_params, return_annotation=None)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in new_params}
    del command.__wrapped__  # Typer must read the new signature, not fn's
    return command


def _wrap_group(group: typer.Typer) -> typer.Typer:
    """Wrap every command of a Typer group (recursively) with the common options."""
    for info in group.registered_commands:
        if info.callback is not None and not getattr(info.callback, "_llmctl_wrapped", False):
            info.callback = with_common_options(info.callback)
            info.callback._llmctl_wrapped = True  # type: ignore[attr-defined]
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _wrap_group(sub.typer_instance)
    return group


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmctl {__version__}")
        raise typer.Exit()


def _root(
    device: Annotated[str, typer.Option(help=f"Compute device: {', '.join(DEVICES)}.")] = "auto",
    dtype: Annotated[str, typer.Option(help=f"Compute dtype: {', '.join(DTYPES)}.")] = "auto",
    seed: Annotated[Optional[int], typer.Option(help="Random seed for everything stochastic.")] = None,
    json: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an llmctl output of the same kind.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    options.__init__()  # type: ignore[misc]  # fresh state for every invocation
    tune_allocator()
    options.update(device=device, dtype=dtype, seed=seed, json=json, quiet=quiet, force=force, debug=debug)


def _help(commands: list[str]) -> str:
    """The root help: what the installed commands do, not what is planned."""
    return (f"llmctl: {', '.join(commands)}: language models from the command line. Every command "
            "reads and writes Hugging Face-style checkpoint directories, so commands chain in shell scripts.")


def build_app() -> typer.Typer:
    """The root Typer app with every loadable command plugin registered."""
    from llmctl import plugins

    app = typer.Typer(
        name="llmctl",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    installed = []
    for plugin in plugins.discover():
        if plugin.status == "ok":
            try:
                _add_command(app, plugin.name, plugin.obj)
                installed.append(plugin.name)
            except Exception as exc:  # a command Typer cannot build must not break the others
                plugin.status, plugin.problem = "broken", f"invalid command: {type(exc).__name__}: {exc}"
        if plugin.status != "ok":
            _warn_plugin(plugin)
    app.callback(help=_help(installed))(_root)
    return app


def _add_command(app: typer.Typer, name: str, obj: Any) -> None:
    """Register `obj` (a function or a Typer group) as `name`, after checking Typer can build it."""
    probe = typer.Typer()
    probe.callback()(lambda: None)
    if isinstance(obj, typer.Typer):
        obj = _wrap_group(obj)
        probe.add_typer(obj, name=name)
        typer.main.get_command(probe)
        app.add_typer(obj, name=name)
    elif callable(obj):
        command = with_common_options(obj)
        probe.command(name)(command)
        typer.main.get_command(probe)
        app.command(name)(command)
    else:
        raise TypeError("entry point is neither a function nor a typer.Typer")


def _warn_plugin(plugin) -> None:
    sys.stderr.write(f"warning: plugin command '{plugin.name}' ({plugin.dist} {plugin.version}): {plugin.problem}\n")


app = build_app()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point. Exits with the command's code; returns it when given `argv`."""
    try:  # the click typer runs on: its vendored copy (recent typer), else the click package
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors

    command = typer.main.get_command(app)
    try:
        returned = command.main(args=argv, prog_name="llmctl", standalone_mode=False)
        code = returned if isinstance(returned, int) else 0  # an exit code, from typer.Exit / --help
    except getattr(click_errors, "NoArgsIsHelpError", ()) as exc:  # bare `llmctl` or group: help shown, exit 2
        code = exc.exit_code
    except click_errors.ClickException as exc:  # click's usage errors: one line, as every other error
        hint = f" (see '{exc.ctx.command_path} -h')" if getattr(exc, "ctx", None) is not None else ""
        sys.stderr.write(f"error: {exc.format_message().rstrip('.')}{hint}\n")
        code = exc.exit_code
    except typer.Abort:
        sys.stderr.write("interrupted\n")
        code = 130
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        code = 130
    except BrokenPipeError:
        code = _broken_pipe()
    if argv is None:
        sys.exit(code)
    return code
