"""The CLI host: help, version, global options, plugins, errors → exit codes, start-up."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, pythonpath, run_process


def make_dist(site: Path, dist: str, commands: dict[str, str], module: str, source: str) -> None:
    """A throwaway installed distribution: module + dist-info with llmctl.commands entry points."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "\n".join(f"{name} = {target}" for name, target in commands.items())
    (info / "entry_points.txt").write_text(f"[llmctl.commands]\n{lines}\n")


PROBE = """
    from __future__ import annotations  # string annotations must resolve in the plugin's module
    import json, typer
    from typing import Annotated
    from llmctl.runtime import options
    from llmctl.errors import UsageError, CheckpointError

    def show(word: str = "x") -> None:
        print(json.dumps({"word": word, "json": options.json, "quiet": options.quiet,
                          "device": options.device, "dtype": options.dtype,
                          "seed": options.seed, "force": options.force}))

    def boom(kind: Annotated[str, typer.Option()] = "usage") -> None:
        if kind == "usage":
            raise UsageError("--flavour: expected one of a, b")
        if kind == "runtime":
            raise CheckpointError("ckpt/model.safetensors is truncated [MASK] [bold]")
        if kind == "interrupt":
            raise KeyboardInterrupt
        raise RuntimeError("something deep broke\\nsecond line")

    group = typer.Typer()

    @group.command()
    def leaf(n: int = 1) -> None:
        print(json.dumps({"n": n, "json": options.json, "seed": options.seed}))
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    make_dist(site, "probe", {"show": "probe_mod:show", "boom": "probe_mod:boom", "grp": "probe_mod:group"}, "probe_mod", PROBE)
    make_dist(site, "broken", {"broken": "broken_mod:cmd"}, "broken_mod", "raise ImportError('needs libfoo')\n")
    make_dist(site, "usurper", {"plugins": "usurper_mod:cmd", "dup": "usurper_mod:cmd"}, "usurper_mod", "def cmd(): print('usurped')\n")
    make_dist(site, "rival", {"dup": "rival_mod:cmd"}, "rival_mod", "def cmd(): print('rival')\n")
    make_dist(site, "badsig", {"badsig": "badsig_mod:cmd"}, "badsig_mod", "def cmd(x: 'NoSuchType'): pass\n")
    return site


def run(site: Path, *args):
    return run_process(*args, env={"PYTHONPATH": pythonpath(site)})


def test_help_lists_commands_and_global_options(llmctl):
    r = llmctl("--help")
    assert r.code == 0
    for word in ("plugins", "config", "--device", "--dtype", "--seed", "--json", "--quiet", "--debug", "--version"):
        assert word in r.stdout


def test_version(llmctl):
    from llmctl import __version__

    r = llmctl("--version")
    assert r.code == 0 and r.stdout.strip() == f"llmctl {__version__}"


@pytest.mark.parametrize("args, line", [
    (["no-such-command"], "error: No such command 'no-such-command' (see 'llmctl -h')"),
    (["plugins", "--no-such-flag"], "error: No such option: --no-such-flag (see 'llmctl plugins -h')"),
    (["info"], "error: Missing argument 'checkpoint' (see 'llmctl info -h')"),
    (["--seed", "many", "info", "x"], "error: Invalid value for '--seed': "),
])
def test_click_usage_errors_are_one_line_exit_2(llmctl, args, line):
    """Click's own usage errors (unknown command or option, missing argument, bad value) are one
    `error:` line like every other error, not a framed usage panel."""
    r = llmctl(*args)
    assert r.code == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(line), r.stderr


def test_a_bare_group_shows_its_help_and_exits_2(llmctl):
    for args in ([], ["tokenize"]):
        r = llmctl(*args)
        assert r.code == 2 and "Usage: llmctl" in r.stdout and r.stdout.count("Usage: llmctl") == 1


def test_global_options_before_and_after_the_command(site):
    after = run(site, "show", "--word", "hi", "--json", "--quiet", "--device", "cpu", "--dtype", "bfloat16", "--seed", "7", "--force")
    assert after.code == 0, after.stderr
    assert json.loads(after.stdout) == {"word": "hi", "json": True, "quiet": True, "device": "cpu",
                                        "dtype": "bfloat16", "seed": 7, "force": True}
    before = run(site, "--json", "--device", "cpu", "--seed", "3", "show")
    assert json.loads(before.stdout) == {"word": "x", "json": True, "quiet": False, "device": "cpu",
                                         "dtype": "auto", "seed": 3, "force": False}
    # one shared mechanism: subcommands of a plugin's group get the options too
    leaf = run(site, "grp", "leaf", "--n", "2", "--json", "--seed", "5")
    assert json.loads(leaf.stdout) == {"n": 2, "json": True, "seed": 5}
    assert "--force" in run(site, "show", "--help").stdout


@pytest.mark.parametrize(
    "kind, code, needle",
    [("usage", 2, "error: --flavour: expected one of a, b"),
     ("runtime", 1, "error: ckpt/model.safetensors is truncated [MASK] [bold]"),  # no markup
     ("other", 1, "RuntimeError: something deep broke (re-run with --debug for the traceback)"),
     ("interrupt", 130, "interrupted")],
)
def test_errors_are_one_line_with_exit_codes(site, kind, code, needle):
    r = run(site, "boom", "--kind", kind)
    assert r.code == code
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    # the site's broken plugins add warnings; the error itself is one line
    assert len([line for line in r.stderr.splitlines() if not line.startswith("warning:")]) == 1


def test_debug_shows_traceback(site):
    r = run(site, "--debug", "boom", "--kind", "other")
    assert r.code == 1
    assert "Traceback" in r.stderr and "something deep broke" in r.stderr


def test_plugin_listing_broken_refused_and_conflicting(site):
    r = run(site, "plugins", "--json")
    assert r.code == 0
    by = {(p["name"], p["distribution"]): p for p in json.loads(r.stdout)}
    assert by[("show", "probe")]["status"] == "ok" and by[("show", "probe")]["version"] == "1.0"
    assert by[("plugins", "llmctl")]["builtin"] is True
    assert by[("broken", "broken")]["status"] == "broken" and "needs libfoo" in by[("broken", "broken")]["problem"]
    assert by[("badsig", "badsig")]["status"] == "broken"
    assert by[("plugins", "usurper")]["status"] == "refused"
    assert by[("dup", "usurper")]["status"] == "conflict" and by[("dup", "rival")]["status"] == "conflict"
    assert "rival" in by[("dup", "usurper")]["problem"] and "usurper" in by[("dup", "rival")]["problem"]
    # each problem is one warning on stderr; the rest of the CLI works
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert any("'broken'" in w and "needs libfoo" in w for w in warnings)
    assert any("'plugins'" in w and "usurper" in w for w in warnings)
    assert sum("'dup'" in w for w in warnings) == 2
    # neither rival wins; the built-in is not replaced
    assert run(site, "dup").code == 2
    assert "usurped" not in run(site, "plugins").stdout


def test_cli_import_is_light():
    code = "import sys, llmctl.cli; print(sorted(m for m in ('torch','numpy','transformers','tokenizers','safetensors') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_completion_does_not_import_torch():
    env = {"_LLMCTL_COMPLETE": "complete_bash", "COMP_WORDS": "llmctl pl", "COMP_CWORD": "1"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "llmctl"], capture_output=True, text=True,
                          env={**__import__("os").environ, **env})
    assert "plugins" in proc.stdout.split()
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "numpy" not in imported


def test_completions_are_current():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_completions.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (ROOT / "completions" / "_llmctl").read_text().startswith("#compdef llmctl")


def test_completions_check_detects_staleness(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_completions
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(gen_completions, "ROOT", tmp_path)
    assert gen_completions.main(["--check"]) == 1
    assert gen_completions.main([]) == 0
    assert gen_completions.main(["--check"]) == 0
    (tmp_path / "completions" / "llmctl.fish").write_text("stale\n")
    assert gen_completions.main(["--check"]) == 1


def test_tune_allocator_applies_on_glibc_unless_malloc_is_tuned(monkeypatch):
    from llmctl import runtime

    if not runtime._glibc():
        assert runtime.tune_allocator() is False
        return
    assert runtime.tune_allocator() is True  # mallopt accepted both thresholds
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # the user's own malloc settings win
    assert runtime.tune_allocator() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert runtime.tune_allocator() is False


def test_an_unknown_device_is_a_usage_error(llmctl, tmp_path):
    from llmctl.errors import UsageError
    from llmctl.runtime import resolve_device

    assert str(resolve_device("cpu")) == "cpu"
    for name in ("bogus", "CPU", "meta", "cuda:x"):
        with pytest.raises(UsageError, match=f"--device {name}: expected one of auto, cpu, cuda, mps"):
            resolve_device(name)
    r = llmctl("--device", "bogus", "eval", tmp_path, "--task", "perplexity")
    assert r.code == 2 and r.stderr.strip() == "error: --device bogus: expected one of auto, cpu, cuda, mps (or cuda:N)"


def test_json_output_is_strict_json(capsys):
    """NaN and ±inf (a diverged loss, an empty metric) print as null, which strict parsers read;
    everything else prints as before, tensors and paths included."""
    import math
    from pathlib import Path

    import torch

    from llmctl.console import print_json

    print_json({"loss": math.nan, "ppl": [1.5, math.inf, -math.inf], "t": torch.tensor([0.5, math.nan]),
                "path": Path("a/b"), "n": 3, "s": "NaN"})
    line = capsys.readouterr().out
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON token {c}")) == \
        {"loss": None, "ppl": [1.5, None, None], "t": [0.5, None], "path": "a/b", "n": 3, "s": "NaN"}


def test_no_command_gives_one_flag_two_meanings():
    """Every command's option names are its own (with the common options its host adds): `export -f`
    meant both --format and --force, and Click silently let --force win."""
    import typer

    from llmctl.cli import app

    def leaves(command, path):
        subcommands = getattr(command, "commands", None)
        if subcommands is None:
            yield path, command
        for name, sub in (subcommands or {}).items():
            yield from leaves(sub, f"{path} {name}")

    for path, command in leaves(typer.main.get_command(app), "llmctl"):
        names = [n for p in command.params for n in (*p.opts, *p.secondary_opts) if n.startswith("-")]
        assert len(names) == len(set(names)), (path, sorted(n for n in names if names.count(n) > 1))
