"""Shared fixtures: run the CLI in-process (`llmctl`) or as a subprocess (`llmctl_proc`)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self):
        import json

        return json.loads(self.stdout)


@pytest.fixture
def llmctl(capsys):
    """Run `llmctl ARGS…` in this process; returns Result(code, stdout, stderr)."""
    from llmctl.cli import main

    def run(*args) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def run_process(*args, env: dict | None = None, input: str | None = None, timeout: float = 300, cwd=None) -> Result:
    """Run `python -m llmctl ARGS…` in a subprocess (for start-up, plugins and signals)."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "llmctl", *map(str, args)],
        capture_output=True, text=True, env=full_env, input=input, timeout=timeout, cwd=cwd,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def pythonpath(*dirs) -> str:
    """PYTHONPATH with `dirs` first, keeping the caller's (where llmctl may be installed)."""
    return os.pathsep.join([*map(str, dirs), *filter(None, [os.environ.get("PYTHONPATH")])])


@pytest.fixture
def llmctl_proc():
    return run_process
