"""Task files and their documents (mutation testing of `core/evaluate/tasks.py`'s `load_task`,
`load_tasks`, `DocumentTask.__post_init__`, `documents` and `prefixes`): where an error points,
the lists its messages join, the smallest `limit`, and the few-shot shortfall's message."""

from __future__ import annotations

import re

import pytest

from llmctl.errors import ConfigError, DataError, UsageError


def _task_file(folder, text: str, name: str = "t.yaml") -> str:
    (folder / name).write_text(text, encoding="utf-8")
    return str(folder / name)


def test_an_unknown_task_type_is_reported_at_the_line_of_its_type_key(tmp_path):
    from llmctl.core.evaluate.tasks import load_task

    path = _task_file(tmp_path, "# a task\ndataset: {builtin: copy}\ntype: generat\n")
    with pytest.raises(ConfigError) as info:
        load_task(path)
    assert str(info.value).startswith(f"{path}:3: config key 'type': unknown task type 'generat'")


def test_an_unknown_benchmark_lists_the_benchmarks_separated_by_commas(tmp_path):
    from llmctl.core.evaluate.sources import BENCHMARKS
    from llmctl.core.evaluate.tasks import load_task

    names = BENCHMARKS.names()
    assert len(names) > 1 and "mmlu" in names
    with pytest.raises(ConfigError, match=re.escape(f"unknown 'mmlux'; choose from: {', '.join(names)}") + "$"):
        load_task(_task_file(tmp_path, "type: multiple_choice\ndataset: {benchmark: mmlux}\n"))


def test_a_flag_no_task_uses_names_every_task_separated_by_commas(tmp_path):
    from llmctl.core.evaluate.tasks import load_tasks

    files = [_task_file(tmp_path, f"type: perplexity\nname: {n}\n", f"{n}.yaml") for n in ("first", "second")]
    with pytest.raises(UsageError, match=r"^--max-new-tokens does not apply to task first, second$"):
        load_tasks(files, {"max_new_tokens": 3})


def test_a_limit_of_one_evaluates_the_first_document_and_zero_is_refused(tmp_path):
    from llmctl.core.evaluate.tasks import load_task

    (tmp_path / "docs.jsonl").write_text('{"input": "a", "target": "b"}\n{"input": "c", "target": "d"}\n',
                                         encoding="utf-8")
    task = load_task(_task_file(tmp_path, "type: generate\ndataset: {path: docs.jsonl}\nlimit: 1\n"))
    assert task.documents() == [(f"{tmp_path / 'docs.jsonl'}:1", {"input": "a", "target": "b"})]
    with pytest.raises(ConfigError, match="'num_fewshot' must be ≥ 0 and 'limit' ≥ 1$"):
        load_task(_task_file(tmp_path, "type: generate\ndataset: {path: docs.jsonl}\nlimit: 0\n"))


def test_a_benchmark_without_its_files_names_the_task(tmp_path):
    from llmctl.core.evaluate.tasks import load_task

    (tmp_path / "empty").mkdir()
    task = load_task(_task_file(tmp_path, "type: multiple_choice\nname: my_mmlu\ndataset: {benchmark: mmlu}\n"),
                     {"data": [str(tmp_path / "empty")]})
    with pytest.raises(DataError, match=rf"^task my_mmlu: no evaluation data in {re.escape(str(tmp_path / 'empty'))};"):
        task.documents()


def test_too_few_few_shot_examples_without_a_group_say_only_how_many_there_are(tmp_path):
    """With no `group_by` the message ends at the count (no group part)."""
    from llmctl.core.evaluate.tasks import load_task

    (tmp_path / "docs.jsonl").write_text("".join(f'{{"input": "q{i}", "target": "a{i}"}}\n' for i in range(3)),
                                         encoding="utf-8")
    task = load_task(_task_file(tmp_path, "type: generate\nname: few\ndataset: {path: docs.jsonl}\nnum_fewshot: 3\n"))
    with pytest.raises(DataError) as info:
        task.contexts(task.documents())
    assert str(info.value) == "task few: --num-fewshot 3 needs more few-shot examples than the 3 available"


def test_a_bad_value_from_a_flag_names_the_flag_and_one_from_the_file_names_its_line(tmp_path):
    from llmctl.core.evaluate.tasks import load_task

    flag = r"config key 'max_new_tokens': expected int, got 'many' \(from --max-new-tokens\)$"
    with pytest.raises(ConfigError, match=flag):
        load_task("copy", {"max_new_tokens": "many"})
    path = _task_file(tmp_path, "type: generate\ndataset: {builtin: copy}\nnum_fewshot: some\n")
    with pytest.raises(ConfigError, match=re.escape(f"expected int, got 'some' (from {path}:3)") + "$"):
        load_task(path)
