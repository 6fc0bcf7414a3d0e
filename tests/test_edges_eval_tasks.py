"""Edges of the evaluation tasks that the task tests miss (found by mutation testing): code tasks and
pass@k (Chen et al., 2021), task files and their documents, prompts and few-shot examples, the
benchmarks' file readers and row converters, the runner and the built-in datasets."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from _recorder import Recorder
from llmctl.core.evaluate.code import pass_at_k
from llmctl.errors import ConfigError, DataError

# -- core/evaluate/code.py -------------------------------------------------------------------------


@pytest.mark.parametrize("n,c,k,expected", [
    (2, 1, 1, 1 / 2),  # one of two samples right: a single draw finds it half the time
    (3, 1, 2, 2 / 3),  # 1 - C(2, 2) / C(3, 2): both draws miss it in 1 of the 3 pairs
    (4, 2, 2, 5 / 6),  # 1 - C(2, 2) / C(4, 2)
    (4, 1, 3, 3 / 4),  # 1 - C(3, 3) / C(4, 3)
    (5, 4, 2, 1.0),  # n - c < k: any 2 of the 5 include a right one
    (5, 3, 2, 9 / 10),  # n - c == k: 1 - C(2, 2) / C(5, 2)
    (5, 0, 5, 0.0),  # nothing right
    (6, 2, 4, 1 - 1 / 15),  # n - c == k: C(4, 4) / C(6, 4) = 1 / 15
])
def test_pass_at_k_is_chens_unbiased_estimator_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("n,c,k", [(3, -1, 1), (3, 4, 1), (3, 1, 0), (3, 1, 4), (0, 0, 1)])
def test_pass_at_k_refuses_counts_outside_its_domain_with_the_counts(n, c, k):
    with pytest.raises(ValueError, match=rf"^pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}$"):
        pass_at_k(n, c, k)


@pytest.mark.parametrize("n,c,k", [(3, 0, 1), (3, 3, 1), (3, 1, 3), (1, 1, 1)])
def test_pass_at_k_accepts_the_ends_of_its_domain(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def _code_task(tmp_path, rows, extra: str = ""):
    from llmctl.core.evaluate.tasks import load_task

    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "code.yaml").write_text("type: code\ndataset: {path: problems.jsonl}\nprompt: \"{{ head }}\"\n"
                                        "program: \"{{ head }}{{ completion }}\\n{{ check }}\"\n" + extra)
    return load_task(str(tmp_path / "code.yaml"))


def test_code_task_runs_each_sample_in_the_sandbox_and_averages_pass_at_k(tmp_path, monkeypatch):
    """Two problems, three samples each: the programs are the template over each document and each of
    its completions, in order, run under the task's limits; each problem's verdicts are its own three;
    pass@k per problem is the estimator; the log holds the statuses and the count right."""
    import llmctl.core.generate as gen
    import llmctl.core.sandbox as sandbox
    from llmctl.core.evaluate.lm import ScoringModel
    from llmctl.core.evaluate.tasks import Task

    rows = [{"head": "def f():\n", "check": "assert f() == 1", "lang": "a"},
            {"head": "def g():\n", "check": "assert g() == 2", "lang": "b"}]
    task = _code_task(tmp_path, rows, "samples: 3\nk: [1, 2]\ntimeout: 3.5\nmemory_mb: 256\nreport_by: [lang]\n")
    completions = {"def f():\n": ["    return 1", "    return 0", "    return 1"],
                   "def g():\n": ["    return 0", "    return 3", "    return 2"]}

    def fake_generate(model, tok, prompts, cfg, context=None, report=None):
        assert cfg.temperature == 0.8  # the code task's default for sampled programs
        return [SimpleNamespace(text=completions[p][i % 3]) for i, p in enumerate(prompts)]

    ran = []

    def fake_run_many(programs, limits):
        ran.append((list(programs), limits))
        return [sandbox.Result("passed" if eval(p.split("return ")[1].split("\n")[0]) == int(p[-1]) else "failed",
                               0, "", "", 0.0) for p in programs]

    monkeypatch.setattr(gen, "generate", fake_generate)
    monkeypatch.setattr(sandbox, "run_many", fake_run_many)
    monkeypatch.setattr(Task, "report", Recorder())
    task.samples_log = []
    result = task.run(ScoringModel(torch.nn.Identity(), None, max_length=64, batch_size=8))
    [(programs, limits)] = ran
    assert programs == [r["head"] + c + "\n" + r["check"] for r in rows for c in completions[r["head"]]]
    assert (limits.timeout, limits.memory_mb) == (3.5, 256)
    assert ("progress", "code tests", 6, "prog") in Task.report.calls
    # f: 2 of 3 right, g: 1 of 3 right
    per_problem = {"pass@1": [2 / 3, 1 / 3], "pass@2": [1.0, 1 - 1 / 3]}
    assert {k: v for k, v in result.items() if "/" not in k} == pytest.approx(
        {"pass@1": 0.5, "pass@1_stderr": 1 / 6, "pass@2": 5 / 6, "pass@2_stderr": 1 / 6, "examples": 2})
    assert [result[f"pass@{k}/{g}"] for k in (1, 2) for g in "ab"] == pytest.approx([2 / 3, 1 / 3, 1.0, 2 / 3])
    assert [r.pop("pass@1") for r in task.samples_log] == pytest.approx(per_problem["pass@1"])
    assert [r.pop("pass@2") for r in task.samples_log] == pytest.approx(per_problem["pass@2"])
    assert task.samples_log == [
        {"doc": f"{tmp_path / 'problems.jsonl'}:{i + 1}", "prompt": r["head"], "generations": completions[r["head"]],
         "statuses": statuses, "correct": correct}
        for i, (r, statuses, correct) in enumerate(zip(rows, [["passed", "failed", "passed"],
                                                              ["failed", "failed", "passed"]], [2, 1]))]


def test_code_task_defaults_and_refusals(tmp_path):
    """k defaults to those of 1, 10, 100 within --samples (both ends included); a k of 0, none, or
    more than the samples is refused; a code task has no reference and no default few-shot answer;
    the program limits default to 10 s and 1 GB."""
    rows = [{"head": "def f():\n", "check": ""}]
    for samples, ks in [(1, [1]), (9, [1]), (10, [1, 10]), (99, [1, 10]), (100, [1, 10, 100])]:
        assert _code_task(tmp_path, rows, f"samples: {samples}\n").k == ks
    task = _code_task(tmp_path, rows)
    assert (task.timeout, task.memory_mb, task.temperature, task.metrics) == (10.0, 1024, 0.8, [])
    assert task.references(("x", {})) == []
    with pytest.raises(ConfigError, match=r"^task code: few-shot examples need a 'fewshot_target' template$"):
        task.example_target(("x", rows[0]))
    for extra in ["k: [0]\n", "k: []\n", "samples: 4\nk: [1, 5]\n", "samples: 4\nk: [0, 2]\n"]:
        with pytest.raises(ConfigError, match=r"^task code: pass@k needs 1 <= k <= --samples \(\d+\), got k="):
            _code_task(tmp_path, rows, extra)
    assert _code_task(tmp_path, rows, "samples: 4\nk: [1, 4]\n").k == [1, 4]
    with pytest.raises(ConfigError, match="config key 'program': invalid template"):
        _code_task(tmp_path, rows, "program: \"{{ head \"\n")
