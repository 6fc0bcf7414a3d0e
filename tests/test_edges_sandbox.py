"""The sandbox's edges (`core/sandbox.py`): exactly the environment a program gets, its stdin,
the limits `run_many` passes on and its worker count, and what Ctrl-C does to running programs."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

import llmctl.core.sandbox as sandbox
from llmctl.core.sandbox import Limits, run_many, run_python


def test_a_program_sees_only_the_documented_environment():
    r = run_python("import json, os, sys\n"
                   "print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd(), 'argv0': sys.argv[0],"
                   " 'stdin': os.path.realpath('/proc/self/fd/0')}))")
    seen = json.loads(r.stdout)
    work = seen["cwd"]
    assert os.path.basename(work).startswith("llmctl-sandbox-")
    assert seen["argv0"] == os.path.join(work, "program.py")
    assert seen["env"] == {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "PYTHONDONTWRITEBYTECODE": "1",
                           "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
    assert seen["stdin"] == "/dev/null"


def test_stdin_is_not_inherited_even_when_ours_is_a_pipe():
    read, write = os.pipe()
    saved = os.dup(0)
    os.dup2(read, 0)
    try:
        os.write(write, b"secret\n")
        r = run_python("import sys\nprint(repr(sys.stdin.read()))", Limits(timeout=5))
    finally:
        os.dup2(saved, 0)
        for fd in (saved, read, write):
            os.close(fd)
    assert r.status == "passed" and r.stdout == "''\n"


def test_run_many_passes_the_limits_on():
    program = "import resource\nprint(resource.getrlimit(resource.RLIMIT_FSIZE)[0] >> 20)"
    assert [r.stdout for r in run_many([program] * 2, Limits(file_mb=3), workers=2)] == ["3\n", "3\n"]


class _Pool(sandbox.ThreadPoolExecutor):
    sizes: list = []

    def __init__(self, max_workers=None):
        self.sizes.append(max_workers)
        super().__init__(max_workers=max_workers)


@pytest.mark.parametrize("workers, cpus, expected", [(3, 8, 3), (None, 5, 5), (None, None, 1)])
def test_run_many_uses_the_given_workers_or_the_cpu_count(monkeypatch, workers, cpus, expected):
    monkeypatch.setattr(sandbox, "ThreadPoolExecutor", _Pool)
    monkeypatch.setattr(sandbox.os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(sandbox, "run_python", lambda source, limits: source)
    _Pool.sizes = []
    assert run_many(["a", "b"], workers=workers) == ["a", "b"]
    assert _Pool.sizes == [expected]


def test_ctrl_c_kills_the_running_programs_and_starts_no_more(monkeypatch):
    """The first program is interrupted while the second runs: the second's process group is
    killed at once (not waited for), and the queued ones never start (the first's worker, freed,
    may take one more before the pool is shut down)."""
    running, killed, started = threading.Event(), [], []

    class Program:
        pid = 4242

    def fake_run(source, limits):
        started.append(source)
        if source == "interrupted":
            assert running.wait(5)
            raise KeyboardInterrupt
        sandbox._live.add(Program)
        running.set()
        for _ in range(100):  # until its process group is killed, as a real program would be
            if killed:
                break
            time.sleep(0.05)
        sandbox._live.discard(Program)
        return "ran"

    monkeypatch.setattr(sandbox, "run_python", fake_run)
    monkeypatch.setattr(sandbox, "_killpg", killed.append)
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run_many(["interrupted", "running", "q1", "q2", "q3"], workers=2)
    assert killed == [4242] and started[:2] == ["interrupted", "running"] and not {"q2", "q3"} & set(started)
    assert time.perf_counter() - start < 3


def test_a_sleeping_program_is_killed_at_the_timeout_with_its_output_kept():
    """A program that uses no CPU outlives RLIMIT_CPU: only killing its process group ends it."""
    start = time.perf_counter()
    r = run_python("import time\nprint('started', flush=True)\ntime.sleep(30)", Limits(timeout=1))
    elapsed = time.perf_counter() - start
    assert r.status == "timeout" and r.stdout == "started\n"
    assert 1 <= r.seconds <= elapsed < 4


def test_output_that_is_not_utf8_is_replaced_not_fatal():
    r = run_python("import sys\nsys.stdout.buffer.write(b'\\xff ok')\nsys.stderr.buffer.write(b'\\xfe')")
    assert r.passed and r.stdout == "\ufffd ok" and r.stderr == "\ufffd"


def test_a_running_program_is_listed_for_ctrl_c_until_it_ends(monkeypatch):
    class Recording(set):
        added, removed = [], []

        def add(self, proc):
            self.added.append(proc)
            super().add(proc)

        def discard(self, proc):
            self.removed.append(proc)
            super().discard(proc)

    live = Recording()
    monkeypatch.setattr(sandbox, "_live", live)
    assert run_python("print(1)").passed
    assert len(live.added) == 1 and live.removed == live.added and live.added[0].pid > 0 and not live


def test_a_non_ascii_program_runs_under_an_ascii_locale():
    """The program file is written as UTF-8 whatever the caller's locale (here plain C, with
    Python's UTF-8 coercion off, where the locale's encoding is ASCII)."""
    import subprocess
    import sys

    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    probe = ("import locale, sys\nfrom llmctl.core.sandbox import run_python\n"
             "r = run_python(\"print(len('\\u00e4\\u00f6\\u00fc'))\")\n"
             "print(locale.getpreferredencoding(False), r.status, r.stdout.strip(), r.stderr[-200:])")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    encoding, status, out = done.stdout.split()[:3]
    assert encoding.lower() in ("ansi_x3.4-1968", "ascii", "us-ascii")  # the premise: not UTF-8
    assert (status, out) == ("passed", "3"), done.stdout + done.stderr
