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

    def fake_generate(model, tok, prompts, cfg, context=None, report=None, first_index=0):
        assert cfg.temperature == 0.8  # the code task's default for sampled programs
        return [SimpleNamespace(text=completions[p][i % 3]) for i, p in enumerate(prompts)]

    ran = []

    def fake_run_many(programs, limits, report=None):
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


# -- core/evaluate/builtin.py ----------------------------------------------------------------------


def test_builtin_arithmetic_spans_two_digit_operands_and_both_operations():
    from llmctl.core.evaluate.builtin import generate

    docs = generate("arithmetic", 3000, 5)
    assert all(set(d) == {"a", "op", "b", "answer"} for d in docs)
    assert {d["op"] for d in docs} == {"+", "-"}
    for key in ("a", "b"):
        assert {d[key] for d in docs} == set(range(100))  # 0 … 99, both ends
    assert all(d["answer"] == str(d["a"] + d["b"] if d["op"] == "+" else d["a"] - d["b"]) for d in docs)


@pytest.mark.parametrize("name", ["copy", "reverse"])
def test_builtin_letter_tasks_are_three_to_eight_lowercase_letters(name):
    from llmctl.core.evaluate.builtin import generate

    docs = generate(name, 2000, 3)
    assert all(set(d) == {"input", "target"} for d in docs)
    letters = [d["input"].split(" ") for d in docs]
    assert {len(s) for s in letters} == set(range(3, 9))
    assert all(len(c) == 1 and "a" <= c <= "z" for s in letters for c in s)
    assert len({c for s in letters for c in s}) == 26
    for d, s in zip(docs, letters):
        assert d["target"] == " ".join(s if name == "copy" else s[::-1])


def test_builtin_word_order_has_four_orders_of_one_sentence_and_any_gold():
    from llmctl.core.evaluate.builtin import ADJECTIVES, DETERMINERS, NOUNS, VERBS, generate

    docs = generate("word_order", 400, 0)
    assert {d["gold"] for d in docs} == {0, 1, 2, 3}
    for d in docs:
        assert set(d) == {"choices", "gold"} and len(d["choices"]) == len(set(d["choices"])) == 4
        words = d["choices"][d["gold"]].split(" ")
        assert [w in pool for w, pool in zip(words, [DETERMINERS, ADJECTIVES, NOUNS, VERBS, DETERMINERS, NOUNS])] == \
               [True] * 6
        assert all(sorted(c.split(" ")) == sorted(words) for c in d["choices"])


# -- core/evaluate/sources.py ----------------------------------------------------------------------


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hellaswag_rows_are_lm_evals_processed_docs(tmp_path):
    from datasets import Dataset
    from lm_eval.tasks.hellaswag.utils import process_docs

    from llmctl.core.evaluate.sources import BENCHMARKS

    rows = [{"activity_label": "Home and Garden", "ctx_a": "[header] How to plant a tree  [title] Dig a hole.",
             "ctx_b": "then you", "endings": ["[step] water it.  ", " Dig  [substeps] deeper [title] Done", "x"],
             "label": "2"},
            {"activity_label": "Removing ice", "ctx_a": "A man is outside.", "ctx_b": "he", "endings": ["a", "b"],
             "label": 0}]
    docs = BENCHMARKS.get("hellaswag").documents("hellaswag", [str(_jsonl(tmp_path / "hellaswag_val.jsonl", rows))])
    expected = process_docs(Dataset.from_list([{**r, "label": str(r["label"])} for r in rows]))
    assert [d for _, d in docs] == [{k: e[k] for k in ("query", "choices", "gold")} for e in expected]


def test_winogrande_rows_are_lm_evals_partial_scoring(tmp_path):
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target, doc_to_text

    from llmctl.core.evaluate.sources import BENCHMARKS

    rows = [{"sentence": "Sarah was a much better surgeon than Maria so _'s cases were easier.", "option1": "Sarah",
             "option2": "Maria", "answer": "2"},
            {"sentence": "The _ was renamed to snake_case in the code.", "option1": "file", "option2": "variable",
             "answer": "1"}]
    docs = BENCHMARKS.get("winogrande").documents("winogrande", [str(_jsonl(tmp_path / "dev.jsonl", rows))])
    assert [d for _, d in docs] == [{"contexts": doc_to_choice(r), "continuation": doc_to_target(r),
                                     "gold": doc_to_text(r)} for r in rows]


def test_arc_rows_of_both_layouts_and_numeric_labels(tmp_path):
    from llmctl.core.evaluate.sources import BENCHMARKS

    hf = [{"id": "1", "question": "Which?", "answerKey": "3",
           "choices": {"text": ["one", "two", "three", "four"], "label": ["1", "2", "3", "4"]}},
          {"id": "2", "question": "What?", "answerKey": "A", "choices": {"text": ["yes", "no"], "label": ["A", "B"]}}]
    _jsonl(tmp_path / "challenge" / "test.jsonl", hf) if (tmp_path / "challenge").mkdir() is None else None
    docs = BENCHMARKS.get("arc_challenge").documents("arc_challenge", [str(tmp_path)])
    assert [d for _, d in docs] == [{"question": "Which?", "choices": ["one", "two", "three", "four"], "gold": 2},
                                    {"question": "What?", "choices": ["yes", "no"], "gold": 0}]


def test_mmlu_rows_of_both_layouts_and_lm_evals_categories(tmp_path):
    """The original CSVs (no header; the subject from the file name, `_test`/`_dev`/`_val` cut; a
    letter answer, spaces around it allowed) and cais/mmlu's rows (choices and an index); every
    subject in lm-eval's category of its `mmlu_*` group, others `uncategorized`."""
    import csv

    from lm_eval.tasks.mmlu._generate_configs import SUBJECTS

    from llmctl.core.evaluate.sources import BENCHMARKS, MMLU_CATEGORIES

    assert MMLU_CATEGORIES == SUBJECTS
    bench = BENCHMARKS.get("mmlu")
    (tmp_path / "test").mkdir()
    with open(tmp_path / "test" / "college_physics_test.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Q1?", "a", "b", "c", "d", "C"], ["Q2?", "w", "x", "y", "z", " A "]])
    with open(tmp_path / "test" / "my_own_topic_val.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Q3?", "a", "b", "c", "d", "D"]])
    docs = [d for _, d in bench.documents("mmlu", [str(tmp_path)])]
    assert docs == [{"subject": "college_physics", "category": "stem", "question": "Q1?",
                     "choices": ["a", "b", "c", "d"], "answer": 2},
                    {"subject": "college_physics", "category": "stem", "question": "Q2?",
                     "choices": ["w", "x", "y", "z"], "answer": 0},
                    {"subject": "my_own_topic", "category": "uncategorized", "question": "Q3?",
                     "choices": ["a", "b", "c", "d"], "answer": 3}]
    rows = [{"question": "Q?", "subject": "philosophy", "choices": ["p", "q", "r", "s"], "answer": 1},
            {"question": "R?", "subject": "virology", "choices": ("p", "q", "r", "s"), "answer": "B"}]
    (tmp_path / "hf").mkdir()
    docs = [d for _, d in bench.documents("mmlu", [str(_jsonl(tmp_path / "hf" / "mmlu_test.jsonl", rows))])]
    assert docs == [{"subject": "philosophy", "category": "humanities", "question": "Q?",
                     "choices": ["p", "q", "r", "s"], "answer": 1},
                    {"subject": "virology", "category": "other", "question": "R?",
                     "choices": ["p", "q", "r", "s"], "answer": 1}]
    (tmp_path / "dev").mkdir()
    with open(tmp_path / "dev" / "econometrics_dev.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Q4?", "a", "b", "c", "d", "B"]])
    [(_, shot)] = bench.documents("mmlu", [str(tmp_path)], fewshot=True)
    assert (shot["subject"], shot["category"], shot["answer"]) == ("econometrics", "social_sciences", 1)


@pytest.mark.parametrize("answer", ["", "  ", "AB", "BCD"])
def test_mmlu_answers_that_are_not_one_letter_are_refused_with_the_row(tmp_path, answer):
    """A blank answer is not A, nor "AB" the first of two letters: the row is refused, naming its line."""
    import csv

    from llmctl.core.evaluate.sources import BENCHMARKS

    (tmp_path / "test").mkdir()
    with open(tmp_path / "test" / "anatomy_test.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Q1?", "a", "b", "c", "d", "B"], ["Q2?", "a", "b", "c", "d", answer]])
    with pytest.raises(DataError, match=rf"^{tmp_path / 'test' / 'anatomy_test.csv'}:2: not a mmlu row \(ValueError: "):
        BENCHMARKS.get("mmlu").documents("mmlu", [str(tmp_path)])


def test_humaneval_rows_keep_the_fields_the_preset_uses(tmp_path):
    from llmctl.core.evaluate.sources import BENCHMARKS

    row = {"task_id": "HumanEval/7", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
           "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    [(where, doc)] = BENCHMARKS.get("humaneval").documents("humaneval", [str(_jsonl(tmp_path / "x.jsonl", [row]))])
    assert where == f"{tmp_path / 'x.jsonl'}:1"
    assert doc == {k: row[k] for k in ("task_id", "prompt", "test", "entry_point")}


def test_mbpp_rows_of_the_full_file_and_of_a_test_split(tmp_path):
    """The full mbpp.jsonl keeps task ids 11-510 (the paper's test split); a file named as the test
    split (any case) keeps every row; `test_setup_code` is empty when absent."""
    from llmctl.core.evaluate.sources import BENCHMARKS

    rows = [{"task_id": i, "text": f"t{i}", "code": f"c{i}", "test_list": ("assert 1",)} for i in (10, 11, 510, 511)]
    rows[1]["test_setup_code"] = "import math"
    bench = BENCHMARKS.get("mbpp")
    full = [d for _, d in bench.documents("mbpp", [str(_jsonl(tmp_path / "mbpp.jsonl", rows))])]
    assert full == [{"task_id": 11, "text": "t11", "code": "c11", "test_list": ["assert 1"], "test_setup_code": "import math"},
                    {"task_id": 510, "text": "t510", "code": "c510", "test_list": ["assert 1"], "test_setup_code": ""}]
    (tmp_path / "hf").mkdir()
    split = bench.documents("mbpp", [str(_jsonl(tmp_path / "hf" / "MBPP-Test.jsonl", rows))])
    assert [d["task_id"] for _, d in split] == [10, 11, 510, 511]


def test_benchmark_files_of_every_format_name_their_rows(tmp_path):
    """JSONL (also gzipped, any case of the name), a JSON list or {"data": list}, JSON Lines named .json,
    CSV with a header (rows from line 2) or without (from line 1), parquet (from 1); the refusals."""
    import csv
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmctl.core.evaluate.sources import read_records

    rows = [{"q": "Größe?", "a": "1"}, {"q": "b", "a": "2"}]
    with gzip.open(tmp_path / "X.JSONL.GZ", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    assert read_records(tmp_path / "X.JSONL.GZ") == [(f"{tmp_path / 'X.JSONL.GZ'}:{i + 1}", r) for i, r in enumerate(rows)]
    for name, text in [("list.json", json.dumps(rows)), ("data.json", json.dumps({"data": rows}))]:
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert read_records(tmp_path / name) == [(f"{tmp_path / name}:[{i}]", r) for i, r in enumerate(rows)]
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert read_records(tmp_path / "lines.json") == [(f"{tmp_path / 'lines.json'}:{i + 1}", r) for i, r in enumerate(rows)]
    with open(tmp_path / "h.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["q", "a"])
        writer.writeheader()
        writer.writerows(rows)
    assert read_records(tmp_path / "h.csv") == [(f"{tmp_path / 'h.csv'}:{i + 2}", r) for i, r in enumerate(rows)]
    assert read_records(tmp_path / "h.csv", ("x", "y")) == [(f"{tmp_path / 'h.csv'}:{i + 1}", r) for i, r in
                                                           enumerate([{"x": "q", "y": "a"}, {"x": "Größe?", "y": "1"},
                                                                      {"x": "b", "y": "2"}])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert read_records(tmp_path / "p.parquet") == [(f"{tmp_path / 'p.parquet'}:{i + 1}", r) for i, r in enumerate(rows)]
    for name, text, match in [("bad.json", "[1, 2", r"bad\.json: invalid JSON \("),
                              ("one.json", '{"q": 1}', r"one\.json: expected a JSON list of objects \(or \{\"data\": \[\.\.\.\]\}\)$"),
                              ("mixed.json", '[{"q": 1}, 2]', r"mixed\.json: expected a JSON list of objects"),
                              ("x.txt", "", r"x\.txt: unknown data format \(expected \.jsonl, \.jsonl\.gz, \.json, \.csv, "
                                            r"\.parquet\)$")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=match):
            read_records(tmp_path / name)


def test_benchmark_splits_are_found_by_the_words_in_their_paths(tmp_path):
    """One file given is the evaluated split whatever its name (not for few-shot); a folder is searched
    for files whose path has a split's word and every required word; the message names what is missing."""
    from llmctl.core.evaluate.sources import BENCHMARKS

    bench = BENCHMARKS.get("arc_easy")
    row = {"question": "Q?", "answerKey": "A", "choices": {"text": ["a", "b"], "label": ["A", "B"]}}
    (tmp_path / "easy").mkdir()
    (tmp_path / "challenge").mkdir()
    for path in ["easy/test-0.jsonl", "easy/train.jsonl", "challenge/test.jsonl", "easy/notes.txt"]:
        _jsonl(tmp_path / path, [row])
    assert [w for w, _ in bench.documents("arc_easy", [str(tmp_path)])] == [f"{tmp_path / 'easy' / 'test-0.jsonl'}:1"]
    assert [w for w, _ in bench.documents("arc_easy", [str(tmp_path)], fewshot=True)] == \
           [f"{tmp_path / 'easy' / 'train.jsonl'}:1"]
    anything = tmp_path / "easy" / "train.jsonl"
    assert [w for w, _ in bench.documents("arc_easy", [str(anything)])] == [f"{anything}:1"]
    with pytest.raises(DataError, match=r"^task arc_easy: no few-shot data in .*challenge.test\.jsonl; expected ARC-Easy"):
        bench.documents("arc_easy", [str(tmp_path / "challenge" / "test.jsonl")], fewshot=True)
    (tmp_path / "two").mkdir()
    both = [str(_jsonl(tmp_path / "two" / f"ARC-{level}-Test.jsonl", [row])) for level in ("Easy", "Challenge")]
    assert [w for w, _ in bench.documents("arc_easy", both)] == [f"{both[0]}:1"]  # two files: by their names
    with pytest.raises(DataError, match=r"^task e: no evaluation data in nothing \(use --data DIR\|FILE\); expected ARC-Easy-Test"
                                        r"\.jsonl .*\(published at https://allenai\.org/data/arc and .*; llmctl downloads "
                                        r"nothing\)$"):
        bench.documents("e", [])
    with pytest.raises(DataError, match=r"^.*test-0\.jsonl:1: not a arc_easy row \(KeyError: 'answerKey'\)$"):
        _jsonl(tmp_path / "easy" / "test-0.jsonl", [{"question": "Q?", "choices": row["choices"]}])
        bench.documents("arc_easy", [str(tmp_path)])


# -- core/evaluate/runner.py -----------------------------------------------------------------------


def test_samples_are_written_as_jsonl_keeping_unicode(tmp_path):
    from llmctl.core.evaluate.runner import write_samples
    from llmctl.errors import UsageError

    path = tmp_path / "out" / "samples.jsonl"
    samples = [{"task": "t", "prompt": "Größe? ☃", "scores": [1.5, None]}, {"task": "u", "answer": ""}]
    write_samples(path, samples)
    text = path.read_text(encoding="utf-8")
    assert text.splitlines() == [json.dumps(s, ensure_ascii=False) for s in samples] and text.endswith("\n")
    assert "Größe? ☃" in text
    with pytest.raises(UsageError):
        write_samples(path, samples[:1])  # an existing file only with force
    write_samples(path, samples[:1], force=True)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == samples[:1]
    write_samples(tmp_path / "empty.jsonl", [])
    assert (tmp_path / "empty.jsonl").read_text() == ""


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from conftest import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny"), ["the cat sees a dog. a dog likes the cat."] * 4, vocab=280,
                      context=32)


def test_evaluate_records_each_task_with_its_type_config_and_finite_metrics(tiny_ckpt, tmp_path, monkeypatch):
    """One checkpoint, a one-document task: the metrics-history entry is the command, the task, its
    registered type, its config without name and base_dir, and the metrics (a NaN stderr as null);
    the samples carry the checkpoint and task; a seed of None is 1234; the report names the model."""
    import shutil

    import llmctl.core.evaluate.runner as runner
    from llmctl.core.evaluate.runner import evaluate
    from llmctl.core.evaluate.tasks import load_task

    loads = []
    load_scorer = runner.load_scorer
    monkeypatch.setattr(runner, "load_scorer", lambda path, **kw: loads.append(kw) or load_scorer(path, **kw))

    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    (tmp_path / "wo.yaml").write_text("type: multiple_choice\ndataset: {builtin: word_order, size: 1}\n"
                                      "prompt: \"Sentence:\"\n")
    task = load_task(str(tmp_path / "wo.yaml"))
    samples, report = [], Recorder()
    results = evaluate([str(ckpt)], [task], device="cpu", dtype=torch.float32, samples=samples, report=report)
    metrics = results[str(ckpt)]["wo"]
    assert metrics["acc_stderr"] is None and metrics["acc"] in (0.0, 1.0) and metrics["examples"] == 1
    [entry] = json.loads((ckpt / "llmctl.json").read_text())["metrics"]
    assert entry.pop("time")
    config = entry.pop("config")
    assert entry == {"command": "eval", "task": "wo", "type": "multiple_choice", "metrics": metrics}
    assert "name" not in config and "base_dir" not in config and config["prompt"] == "Sentence:"
    assert config["dataset"]["builtin"] == "word_order" and config["metrics"] == ["acc", "acc_norm"]
    assert [(s["checkpoint"], s["task"]) for s in samples] == [(str(ckpt), "wo")]
    assert loads == [{"device": "cpu", "dtype": torch.float32, "batch_size": None, "seed": 1234}]
    evaluate([str(ckpt)], [task], device="cpu", dtype=torch.float32, batch_size=2, seed=7, record=False)
    assert loads[1] == {"device": "cpu", "dtype": torch.float32, "batch_size": 2, "seed": 7}
    assert len(json.loads((ckpt / "llmctl.json").read_text())["metrics"]) == 1  # record=False
    n = sum(p.numel() for p in __import__("llmctl.core.model.io", fromlist=["load_model"]).load_model(ckpt)[0].parameters())
    assert report.messages() == [("info", f"[bold]{ckpt}[/bold]: {n:,} parameters, context 32")]


def test_results_that_cannot_be_recorded_say_why_and_suggest_no_record(tmp_path, monkeypatch):
    import llmctl.core.checkpoint as checkpoint
    from llmctl.core.evaluate.runner import record_results
    from llmctl.core.evaluate.tasks import load_task
    from llmctl.errors import CheckpointError, OutputLocked

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "wo.yaml").write_text("type: multiple_choice\ndataset: {builtin: word_order, size: 1}\n")
    tasks = [load_task(str(tmp_path / "wo.yaml"))]
    results = {str(tmp_path / "ckpt"): {"wo": {"acc": 1.0}}}
    for exc, why in [(PermissionError(13, "Permission denied"), "Permission denied"), (OSError("disk gone"), "disk gone"),
                     (OutputLocked("held by pid 7"), "held by pid 7")]:
        def fail(path, record, exc=exc):
            raise exc
        monkeypatch.setattr(checkpoint, "append_metrics", fail)
        with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'ckpt'}: could not record the results in its "
                                                  rf"llmctl\.json \({why}\); the results were printed; use --no-record "
                                                  r"to skip recording$"):
            record_results(results, tasks)


def test_load_scorer_opens_the_checkpoint_first_and_needs_its_tokenizer(tiny_ckpt, tmp_path):
    import shutil

    from llmctl.core.evaluate.runner import load_scorer
    from llmctl.errors import CheckpointError, UsageError

    with pytest.raises(UsageError, match=r"^checkpoint \S+nowhere does not exist$"):
        load_scorer(tmp_path / "nowhere", device="cpu", dtype=torch.float32)
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    lm = load_scorer(ckpt, device="cpu", dtype=torch.bfloat16, batch_size=3, seed=9)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert (lm.batch_size, lm.seed, lm.max_length) == (3, 9, 32)
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint has no tokenizer \(tokenizer\.json\); eval needs one"):
        load_scorer(ckpt, device="cpu", dtype=torch.float32)


# -- core/evaluate/tasks.py ------------------------------------------------------------------------


def _task_file(tmp_path, text: str, name: str = "t.yaml"):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_task_files_name_type_and_overrides(tmp_path, monkeypatch):
    """The type is required and checked (with a suggestion), the name is the file's stem unless given,
    relative paths are the file's folder's, overrides set only the keys the type has, a flag no task
    uses and a task given twice are usage errors."""
    from llmctl.core.evaluate.tasks import TASK_TYPES, load_task, load_tasks
    from llmctl.errors import UsageError

    load_task("copy")  # imports the modules that register the built-in types
    types = ", ".join(TASK_TYPES.names())
    with pytest.raises(ConfigError, match=rf"t\.yaml: missing config key 'type' \(one of: {types}\)$"):
        load_task(_task_file(tmp_path, "dataset: {builtin: copy}\n"))
    with pytest.raises(ConfigError, match=r"config key 'type': unknown task type 'generat' \(did you mean 'generate'\?\); "
                                          rf"choose from: {types}$"):
        load_task(_task_file(tmp_path, "type: generat\ndataset: {builtin: copy}\n"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "docs.jsonl").write_text('{"input": "a", "target": "b"}\n')
    monkeypatch.chdir(tmp_path)
    task = load_task(_task_file(tmp_path / "sub", "type: generate\ndataset: {path: docs.jsonl}\n", "copying.yaml"),
                     {"max_new_tokens": 5, "num_fewshot": None, "choices": "x"})
    assert (task.name, task.base_dir, task.max_new_tokens, task.num_fewshot) == ("copying", str(tmp_path / "sub"), 5, 0)
    assert task.documents() == [(f"{tmp_path / 'sub' / 'docs.jsonl'}:1", {"input": "a", "target": "b"})]
    named = load_task(_task_file(tmp_path, "type: generate\nname: mine\ndataset: {builtin: copy}\n"))
    assert named.name == "mine"
    with pytest.raises(UsageError, match=r"^--max-new-tokens does not apply to task mine$"):
        load_tasks([_task_file(tmp_path, "type: perplexity\nname: mine\n")], {"max_new_tokens": 3})
    with pytest.raises(UsageError, match=r"^--task: a task is given twice \(copy, copy\)$"):
        load_tasks(["copy", "copy"])
    assert [t.name for t in load_tasks(["copy", "reverse"], {"max_new_tokens": None})] == ["copy", "reverse"]


def test_dataset_sources_and_their_refusals(tmp_path):
    from llmctl.core.evaluate.builtin import generate
    from llmctl.core.evaluate.tasks import load_task

    head = "type: generate\n"
    for dataset, match in [("{}", "needs exactly one of 'path', 'builtin' or 'benchmark'"),
                           ("{path: a.jsonl, builtin: copy}", "needs exactly one of"),
                           ("{benchmark: mmlux}", r"config key 'dataset.benchmark': unknown 'mmlux'; choose from: .*mmlu"),
                           ("{builtin: copyy}", r"config key 'dataset.builtin': unknown 'copyy'; choose from: arithmetic, "
                                                r"copy, reverse, word_order$")]:
        with pytest.raises(ConfigError, match=match):
            load_task(_task_file(tmp_path, head + f"dataset: {dataset}\n"))
    for extra, match in [("fewshot_sampler: last\n", "'fewshot_sampler': expected 'random' or 'first_n'"),
                         ("num_fewshot: -1\n", "'num_fewshot' must be ≥ 0 and 'limit' ≥ 1"),
                         ("limit: 0\n", "'num_fewshot' must be ≥ 0 and 'limit' ≥ 1"),
                         ("fewshot_target: '{{ x '\n", "config key 'fewshot_target': invalid template"),
                         ("description: '{% if %}'\n", "config key 'description': invalid template")]:
        with pytest.raises(ConfigError, match=match):
            load_task(_task_file(tmp_path, head + "dataset: {builtin: copy}\n" + extra))
    task = load_task(_task_file(tmp_path, head + "dataset: {builtin: copy, size: 7, seed: 3}\nlimit: 5\n"), {"data": ["x"]})
    assert task.data == [] and not task.uses("data") and task.uses("limit") and not task.uses("choices")
    assert task.documents() == [(f"builtin:copy:{i + 1}", d) for i, d in enumerate(generate("copy", 7, 3)[:5])]
    bench = load_task("mmlu", {"data": ["somewhere"]})
    assert bench.data == ["somewhere"] and bench.uses("data")
    task = load_task(_task_file(tmp_path, head + "dataset: {path: nowhere.jsonl}\n"))
    with pytest.raises(DataError, match=r"^task t: data file nowhere\.jsonl not found$"):
        task.prepare()


def test_fewshot_pools_and_samplers(tmp_path):
    """Examples written in the task file (named by their index), a built-in's separate split (seed + 1,
    at least 64 or 8 per shot), the first_n sampler's first examples, group_by's pools and the message
    when a group has too few."""
    from llmctl.core.evaluate.builtin import generate
    from llmctl.core.evaluate.tasks import load_task

    task = load_task(_task_file(tmp_path, "type: generate\ndataset: {builtin: copy, seed: 4}\n"), {"num_fewshot": 10})
    assert task.fewshot_pool([]) == [(f"builtin:copy:fewshot:{i + 1}", d) for i, d in enumerate(generate("copy", 80, 5))]
    task.num_fewshot = 2
    assert [d for _, d in task.fewshot_pool([])] == generate("copy", 64, 5)
    text = ("type: generate\ndataset: {builtin: copy, size: 2, fewshot_samples: [{input: p, target: P}, "
            "{input: q, target: Q}, {input: r, target: R}]}\nfewshot_sampler: first_n\nprompt: 'In: {{ input }}'\n"
            "fewshot_delimiter: ' | '\ndescription: 'D{{ target|length }}. '\n")
    task = load_task(_task_file(tmp_path, text), {"num_fewshot": 2})
    assert task.fewshot_pool([])[1] == ("task t: fewshot_samples[1]", {"input": "q", "target": "Q"})
    docs = task.documents()
    assert task.prefixes(docs) == [f"D{len(d['target'])}. In: p P | In: q Q | " for _, d in docs]
    rows = [{"input": f"x{i}", "target": f"y{i}", "g": "ab"[i % 2]} for i in range(5)]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(_task_file(tmp_path, "type: generate\ndataset: {path: g.jsonl}\ngroup_by: g\n"
                                          "fewshot_sampler: first_n\n"), {"num_fewshot": 1})
    docs = task.documents()
    # the same split: one more drawn, the document itself dropped
    assert task.prefixes(docs) == ["x2 y2\n\n", "x3 y3\n\n", "x0 y0\n\n", "x1 y1\n\n", "x0 y0\n\n"]
    task.num_fewshot = 2
    with pytest.raises(DataError, match=r"^task t: --num-fewshot 2 needs more few-shot examples than the 2 available "
                                        r"for g 'b'$"):
        task.prefixes(docs)


def test_templates_name_the_document_or_the_unsafe_operation(tmp_path):
    from llmctl.core.evaluate.tasks import field_value, load_task

    task = load_task(_task_file(tmp_path, "type: generate\ndataset: {builtin: copy}\nprompt: '{{ question }}'\n"))
    with pytest.raises(DataError, match=r"^here:3: template 'prompt': 'question' is undefined$"):
        task.render("prompt", ("here:3", {"input": "a"}))
    task.prompt = "{{ input.__class__.__mro__ }}"
    with pytest.raises(ConfigError, match=r"^task t: config key 'prompt': the template tried an unsafe operation \(.*\); "
                                          r"templates may only format the document's fields$"):
        task.render("prompt", ("here:3", {"input": "a"}))
    task.prompt = "{{ doc.input }}{{ extra }}"
    assert task.render("prompt", ("here:3", {"input": "a"}), extra="!") == "a!"
    task.prompt = "{{ input }}\n"
    assert task.render("prompt", ("here:3", {"input": "a"})) == "a\n"  # a trailing newline is kept
    with pytest.raises(DataError, match=r"^f:2: missing field 'b' \(have: a, c\)$"):
        field_value(("f:2", {"a": 1, "c": 2}), "b")
    with pytest.raises(DataError, match=r"^f:2: missing field 'b' \(have: none\)$"):
        field_value(("f:2", {}), "b")
