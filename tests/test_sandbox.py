"""The code sandbox (time, memory, process, file and network limits) and pass@k on HumanEval
and MBPP presets."""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from llmctl.core.evaluate.code import pass_at_k
from llmctl.core import sandbox
from llmctl.core.report import Silent
from llmctl.core.sandbox import Limits, network_isolated, processes_blocked, run_many, run_python
from llmctl.errors import LlmctlError


def live_processes() -> int:
    return len(subprocess.run(["ps", "-e", "-o", "pid="], capture_output=True, text=True).stdout.split())


def test_a_program_runs_in_a_fresh_directory_without_the_environment(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "x")
    r = run_python("import os, sys\nprint(os.getcwd(), 'SECRET_TOKEN' in os.environ, len(os.listdir('.')))\n"
                   "sys.exit(3)")
    cwd, leaked, entries = r.stdout.split()
    assert r.status == "failed" and r.returncode == 3 and not r.passed
    assert "llmctl-sandbox-" in cwd and leaked == "False" and entries == "1"  # just program.py
    assert not os.path.exists(cwd)  # removed afterwards
    assert run_python("assert sum(range(4)) == 6").passed


def test_infinite_loop_is_killed_at_the_timeout():
    start = time.perf_counter()
    r = run_python("while True:\n    pass\n", Limits(timeout=1))
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - start < 5


def test_memory_bomb_fails_within_its_address_space():
    r = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))\n", Limits(memory_mb=256))
    assert r.status == "failed" and "MemoryError" in r.stderr


def test_fork_bomb_cannot_start_processes():
    assert processes_blocked() or os.getuid() != 0  # root ignores RLIMIT_NPROC: the seccomp filter must hold
    before = live_processes()
    start = time.perf_counter()
    r = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                   Limits(timeout=2, max_processes=32))
    assert r.status == "timeout" and time.perf_counter() - start < 6
    assert live_processes() < before + 10  # nothing multiplied, nothing left behind
    r = run_python("import subprocess\nsubprocess.run(['true'])\n")
    assert r.status == "failed" and "Operation not permitted" in r.stderr
    r = run_python("import threading\nt = threading.Thread(target=print, args=('thread',))\nt.start()\nt.join()\n")
    assert r.passed and r.stdout == "thread\n"  # threads still work


def test_file_size_is_limited():
    r = run_python("open('big', 'wb').write(b'x' * (8 << 20))\n", Limits(file_mb=1))
    assert r.status == "failed" and "File too large" in r.stderr


def test_network_is_unreachable_or_reported():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('connected')\n"
    try:
        blocked, open_ = run_python(program), run_python(program, Limits(network=True))
    finally:
        server.close()
    assert open_.passed and open_.stdout == "connected\n"  # the program itself is right
    if network_isolated():
        assert blocked.status == "failed" and "connected" not in blocked.stdout
    else:  # no user namespaces here: the documented limitation, reported rather than hidden
        assert blocked.passed


def test_run_many_keeps_order():
    results = run_many([f"print({i})" for i in range(6)], workers=3)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]


def test_interrupt_ends_running_programs_at_once(tmp_path):
    script = tmp_path / "many.py"
    script.write_text("from llmctl.core.sandbox import Limits, run_many\n"
                      "print('start', flush=True)\n"
                      "run_many(['while True: pass'] * 4, Limits(timeout=60), workers=2)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "start\n"
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    start = time.perf_counter()
    _, err = proc.communicate(timeout=30)
    assert "KeyboardInterrupt" in err and time.perf_counter() - start < 10


# ------------------------------------------------------------------------ when the namespace is refused

REFUSING = sandbox._BOOTSTRAP.replace("libc.unshare(0x10000000 | 0x40000000)", "libc.unshare(-1)")


def flaky(log, refusals: int, hang: float = 0.0) -> str:
    """A bootstrap that appends a line to `log` each time it runs, refuses the namespace its first
    `refusals` times (after sleeping `hang` seconds), then runs the program as the real one would."""
    return (f"import os, sys, time\nlog = {str(log)!r}\nruns = open(log).read().count('x') if os.path.exists(log) else 0\n"
            "open(log, 'a').write('x')\n"
            f"if runs < {refusals}:\n    time.sleep({hang})\n"
            "    sys.stderr.write('llmctl-sandbox: unshare: Busy\\n')\n    sys.exit(97)\n"
            "os.execv(sys.executable, [sys.executable, '-I', '-B', sys.argv[-1]])\n")


def tries(log) -> int:
    return log.read_text().count("x")


class Recorder(Silent):
    def __init__(self):
        self.warnings = []

    def warn(self, message):
        self.warnings.append(message)


@pytest.fixture
def probe(monkeypatch):
    """`network_isolated` probes afresh, and forgets what it found afterwards."""
    sandbox.network_isolated.cache_clear()
    yield monkeypatch
    sandbox.network_isolated.cache_clear()


def test_a_bootstrap_refused_its_namespace_says_why_and_exits_97():
    done = subprocess.run([sys.executable, "-I", "-c", REFUSING, "10", "1024", "1", "512", "1", os.devnull],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (97, "llmctl-sandbox: unshare: Invalid argument\n")


def test_the_probe_agrees_with_the_kernel(probe):
    """The probe (the bootstrap with its limits) against a bare unshare of a user + network namespace."""
    direct = subprocess.run([sys.executable, "-I", "-c", "import ctypes, sys\n"
                             "sys.exit(ctypes.CDLL(None).unshare(0x10000000 | 0x40000000) != 0)"], timeout=60)
    assert sandbox.network_isolated() is (direct.returncode == 0)


def test_the_probe_says_not_isolated_when_the_namespace_is_refused_and_prints_nothing(probe, capfd):
    probe.setattr(sandbox, "_BOOTSTRAP", REFUSING)
    assert sandbox.network_isolated() is False
    assert capfd.readouterr() == ("", "")


def test_the_probe_tries_twice_before_switching_isolation_off(probe, tmp_path):
    probe.setattr(sandbox, "_BOOTSTRAP", flaky(tmp_path / "once", refusals=1))
    assert sandbox.network_isolated() is True and tries(tmp_path / "once") == 2
    sandbox.network_isolated.cache_clear()
    probe.setattr(sandbox, "_BOOTSTRAP", flaky(tmp_path / "twice", refusals=2))
    assert sandbox.network_isolated() is False and tries(tmp_path / "twice") == 2


def test_a_probe_that_hangs_counts_as_a_refusal_and_is_tried_again(probe, tmp_path):
    probe.setattr(sandbox, "PROBE_TIMEOUT", 2.0)
    probe.setattr(sandbox, "_BOOTSTRAP", flaky(tmp_path / "log", refusals=1, hang=60))
    start = time.perf_counter()
    assert sandbox.network_isolated() is True and tries(tmp_path / "log") == 2
    assert time.perf_counter() - start < 30


def test_a_program_whose_namespace_is_refused_is_an_error_not_a_failed_verdict(monkeypatch):
    monkeypatch.setattr(sandbox, "network_isolated", lambda: True)
    monkeypatch.setattr(sandbox, "_BOOTSTRAP", REFUSING)
    with pytest.raises(LlmctlError, match=r"^the sandbox could not give a program its own network namespace "
                                          r"\(unshare: Invalid argument\)$"):
        run_python("print(1)\n")


def test_a_refusal_once_is_retried_and_the_program_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "network_isolated", lambda: True)
    monkeypatch.setattr(sandbox, "_BOOTSTRAP", flaky(tmp_path / "once", refusals=1))
    r = run_python("print(1)\n")
    assert r.passed and r.stdout == "1\n" and tries(tmp_path / "once") == 2
    monkeypatch.setattr(sandbox, "_BOOTSTRAP", flaky(tmp_path / "twice", refusals=2))
    with pytest.raises(LlmctlError, match=r"\(unshare: Busy\)$"):
        run_python("print(1)\n")
    assert tries(tmp_path / "twice") == 2


def test_a_program_that_exits_97_itself_is_a_failure(monkeypatch):
    monkeypatch.setattr(sandbox, "network_isolated", lambda: True)
    r = run_python("import sys\nsys.stderr.write('llmctl-sandbox: unshare: mine\\n')\nsys.exit(97)\n",
                   Limits(network=True))
    assert (r.status, r.returncode) == ("failed", 97)


@pytest.mark.parametrize("isolated,network,warned", [(False, False, True), (True, False, False), (False, True, False)])
def test_run_many_warns_when_programs_will_reach_the_network(monkeypatch, isolated, network, warned):
    monkeypatch.setattr(sandbox, "network_isolated", lambda: isolated)
    report = Recorder()
    assert [r.stdout for r in run_many(["print(2)"], Limits(network=network), report=report)] == ["2\n"]
    assert report.warnings == ([sandbox.NOT_ISOLATED] if warned else [])


# ------------------------------------------------------------------------ pass@k


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (10, 8, 5), (200, 17, 100), (5, 5, 5)])
def test_pass_at_k_equals_the_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12, abs=1e-15)
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


class FakeResult:
    def __init__(self, text):
        self.text = text


HUMANEVAL = [
    {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "entry_point": "add",
     "canonical_solution": "    return a + b\n", "test": "def check(f):\n    assert f(2, 3) == 5\n"},
    {"task_id": "HumanEval/1", "prompt": "def neg(a):\n", "entry_point": "neg",
     "canonical_solution": "    return -a\n", "test": "def check(f):\n    assert f(2) == -2\n"},
]


def test_humaneval_pass_at_k_with_sampled_programs(monkeypatch, tmp_path):
    """4 samples per problem (2 and 0 correct, one an infinite loop): pass@1 and pass@2 as the
    estimator gives them; the programs are prompt + completion + tests + check(entry_point)."""
    import torch

    import llmctl.core.generate as gen
    from llmctl.core.evaluate.lm import ScoringModel
    from llmctl.core.evaluate.tasks import load_tasks

    completions = {"HumanEval/0": ["    return a + b\n", "    return a - b\n", "    return b + a\n",
                                   "    while True: pass\n"],
                   "HumanEval/1": ["    return a\n", "    return 2 * a\n", "    return a + 1\n", "    raise ValueError\n"]}
    calls = []

    def fake_generate(model, tok, prompts, cfg, context=None, report=None, first_index=0):
        calls.append((prompts, cfg))
        return [FakeResult(completions[next(d["task_id"] for d in HUMANEVAL if d["prompt"] == p)][i % 4])
                for i, p in enumerate(prompts)]

    monkeypatch.setattr(gen, "generate", fake_generate)
    with gzip.open(tmp_path / "HumanEval.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in HUMANEVAL)
    task = load_tasks(["humaneval"], {"data": [str(tmp_path / "HumanEval.jsonl.gz")], "samples": 4})[0]
    task.k, task.timeout = [1, 2], 2.0
    task.samples_log = []
    result = task.run(ScoringModel(torch.nn.Identity(), None, max_length=64, batch_size=8))
    prompts, cfg = calls[0]
    assert prompts == [HUMANEVAL[0]["prompt"]] * 4 + [HUMANEVAL[1]["prompt"]] * 4
    assert cfg.temperature > 0 and "\ndef" in cfg.stop
    assert result["pass@1"] == pytest.approx((pass_at_k(4, 2, 1) + pass_at_k(4, 0, 1)) / 2) == 0.25
    assert result["pass@2"] == pytest.approx((1 - math.comb(2, 2) / math.comb(4, 2)) / 2)
    assert [r["statuses"] for r in task.samples_log] == [["passed", "failed", "passed", "timeout"], ["failed"] * 4]


def test_mbpp_preset_three_shot_prompt_and_program(monkeypatch, tmp_path):
    import torch

    import llmctl.core.generate as gen
    from llmctl.core.evaluate.lm import ScoringModel
    from llmctl.core.evaluate.tasks import load_tasks

    rows = [{"task_id": 11, "text": "Write a function to double x.", "code": "def double(x):\n    return 2 * x",
             "test_list": ["assert double(1) == 2", "assert double(0) == 0", "assert double(-2) == -4"]}]
    (tmp_path / "mbpp.jsonl").write_text(json.dumps(rows[0]) + "\n")
    seen = []

    def fake_generate(model, tok, prompts, cfg, context=None, report=None, first_index=0):
        seen.extend(prompts)
        return [FakeResult("def double(x):\n    return x + x\n") for _ in prompts]

    monkeypatch.setattr(gen, "generate", fake_generate)
    task = load_tasks(["mbpp"], {"data": [str(tmp_path / "mbpp.jsonl")]})[0]
    result = task.run(ScoringModel(torch.nn.Identity(), None, max_length=64, batch_size=8))
    assert result["pass@1"] == 1.0 and result["examples"] == 1
    prompt = seen[0]
    assert prompt.count("[BEGIN]\n") == 4 and prompt.count("\n[DONE]") == 3  # 3 shots, then the problem
    assert prompt.startswith("You are an expert Python programmer, and here is your task: Write a function to find "
                             "the similar elements from the given two tuple lists.")
    assert prompt.endswith("assert double(-2) == -4\n[BEGIN]\n")


def test_pass_at_k_needs_enough_samples(tmp_path):
    from llmctl.core.evaluate.tasks import load_tasks
    from llmctl.errors import ConfigError

    task = tmp_path / "t.yaml"
    task.write_text("type: code\ndataset: {benchmark: humaneval}\nk: [1, 10]\n")
    with pytest.raises(ConfigError, match="--samples"):
        load_tasks([str(task)], {"samples": 5})
    assert load_tasks(["humaneval"])[0].k == [1]
    assert load_tasks(["humaneval"], {"samples": 20})[0].k == [1, 10]


def test_a_code_task_warns_on_its_report_when_programs_reach_the_network(monkeypatch, tmp_path):
    import torch

    import llmctl.core.generate as gen
    from llmctl.core.evaluate.lm import ScoringModel
    from llmctl.core.evaluate.tasks import load_tasks

    monkeypatch.setattr(gen, "generate", lambda model, tok, prompts, cfg, context=None, report=None, first_index=0:
                        [FakeResult("    return a + b\n") for _ in prompts])
    monkeypatch.setattr(sandbox, "network_isolated", lambda: False)
    with gzip.open(tmp_path / "HumanEval.jsonl.gz", "wt") as f:
        f.write(json.dumps(HUMANEVAL[0]) + "\n")
    task = load_tasks(["humaneval"], {"data": [str(tmp_path / "HumanEval.jsonl.gz")], "samples": 1})[0]
    task.report = Recorder()
    assert task.run(ScoringModel(torch.nn.Identity(), None, max_length=64, batch_size=8))["pass@1"] == 1.0
    assert task.report.warnings == [sandbox.NOT_ISOLATED]
