"""Benchmark presets on local files: requests, log-likelihoods, acc and acc_norm equal
lm-evaluation-harness's (its own task YAMLs, run through its HF backend on the same model and
rows); file formats; MMLU's subject averages; GSM8K's prompt and answer extraction; errors."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest

import torch
import transformers

from conftest import tiny_llama

WORDS = ("the quick brown fox jumps over lazy dog stitch in time saves nine to be or not that is question "
         "whether nobler mind suffer slings arrows outrageous fortune take arms against sea troubles").split()


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny HF Llama with a byte-level BPE tokenizer (BOS/EOS/PAD), 512 positions."""
    texts = [" ".join(WORDS), "Question: Answer: A. B. C. D. The following are multiple"] * 5
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama-bench"), texts, vocab=400, context=512)


@pytest.fixture(scope="module")
def lm(hf_dir):
    from llmctl.core.evaluate.runner import load_scorer

    return load_scorer(hf_dir, device="cpu", dtype=torch.float32, batch_size=8)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------ data in each format
SUBJECTS = ("abstract_algebra", "world_religions")


def mmlu_rows(rng, subject, n):
    return [{"question": words(rng, 3, 8) + "?", "subject": subject, "choices": [words(rng, 1, 3) for _ in range(4)],
             "answer": rng.randrange(4)} for _ in range(n)]


def write_benchmarks(root):
    """Rows of every multiple-choice benchmark in its published layout; {task: (data, lm-eval splits)}."""
    rng = random.Random(0)
    out = {}
    mmlu = root / "mmlu"
    for subject in SUBJECTS:
        write_jsonl(mmlu / subject / "test.jsonl", mmlu_rows(rng, subject, 12))
        write_jsonl(mmlu / subject / "dev.jsonl", mmlu_rows(rng, subject, 5))
    out["mmlu"] = mmlu
    hs = [{"ind": i, "activity_label": words(rng, 1, 2), "ctx_a": words(rng, 4, 8), "ctx_b": words(rng, 1, 3),
           "endings": [words(rng, 1, 4) + rng.choice(["", " [title] step", " [header]"]) for _ in range(4)],
           "label": rng.randrange(4), "split": "val"} for i in range(24)]
    out["hellaswag"] = write_jsonl(root / "hellaswag_val.jsonl", hs)
    for level in ("Easy", "Challenge"):
        rows = []
        for i in range(16):
            labels = ["A", "B", "C", "D"] if i % 3 else ["1", "2", "3"]
            rows.append({"id": f"q{i}", "question": words(rng, 3, 8) + "?",
                         "choices": {"text": [words(rng, 1, 4) for _ in labels], "label": labels},
                         "answerKey": rng.choice(labels)})
        write_jsonl(root / "arc" / f"ARC-{level}" / "test.jsonl", rows)
    out["arc_easy"] = out["arc_challenge"] = root / "arc"
    wino = [{"sentence": f"{words(rng, 2, 5)} _ {words(rng, 2, 5)}.", "option1": words(rng, 1, 2),
             "option2": words(rng, 1, 2), "answer": rng.choice("12")} for _ in range(24)]
    out["winogrande"] = write_jsonl(root / "winogrande" / "dev.jsonl", wino)
    tqa = []
    for _ in range(12):
        mc1 = [words(rng, 2, 5) for _ in range(rng.randint(2, 4))]
        n_true = rng.randint(1, 3)
        mc2 = [words(rng, 2, 5) for _ in range(n_true + rng.randint(1, 3))]
        tqa.append({"question": words(rng, 3, 6) + "?",
                    "mc1_targets": {"choices": mc1, "labels": [1] + [0] * (len(mc1) - 1)},
                    "mc2_targets": {"choices": mc2, "labels": [1] * n_true + [0] * (len(mc2) - n_true)}})
    out["truthfulqa_mc1"] = out["truthfulqa_mc2"] = write_jsonl(root / "truthfulqa" / "validation.jsonl", tqa)
    return out


LM_EVAL_TASKS = {  # our preset: (lm-eval YAML, the splits its data files stand for)
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test"),
    "winogrande": ("winogrande/default.yaml", "validation"),
    "truthfulqa_mc1": ("truthfulqa/truthfulqa_mc1.yaml", "validation"),
    "truthfulqa_mc2": ("truthfulqa/truthfulqa_mc2.yaml", "validation"),
}


def lm_eval_config(task_yaml: str, files: dict[str, str]) -> dict:
    """lm-eval's own task config, reading `files` ({split: path}) instead of the Hub."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(os.path.join(os.path.dirname(lm_eval.__file__), "tasks", task_yaml))
    splits = {"training_split": "train", "validation_split": "validation", "test_split": "test", "fewshot_split": "dev"}
    for key, split in splits.items():
        if key in cfg or split in files:
            cfg[key] = split if split in files else None
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files})
    return cfg


@pytest.fixture(scope="module")
def lm_eval_samples(hf_dir, tmp_path_factory):
    """lm-eval's per-document samples for every preset, from one run of its HF backend."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    root = tmp_path_factory.mktemp("benchmarks")
    data = write_benchmarks(root)
    configs = []
    for name, (task_yaml, split) in LM_EVAL_TASKS.items():
        path = data[name] if data[name].is_file() else data[name] / f"ARC-{name.split('_')[1].capitalize()}" / "test.jsonl"
        configs.append({**lm_eval_config(task_yaml, {split: str(path)}), "task": f"local_{name}"})
    for subject in SUBJECTS:
        files = {split: str(data["mmlu"] / subject / f"{split}.jsonl") for split in ("test", "dev")}
        configs.append({**lm_eval_config(f"mmlu/default/mmlu_{subject}.yaml", files), "task": f"local_mmlu_{subject}",
                        "num_fewshot": 5})
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    res = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=8, max_length=512), tasks=configs,
                          bootstrap_iters=0, log_samples=True)
    return data, res["samples"], res["results"]


def run_preset(lm, name, data):
    from llmctl.core.evaluate.tasks import load_tasks

    task = load_tasks([name], {"data": [str(data)]})[0]
    task.samples_log = []
    return task.run(lm), task.samples_log


@pytest.mark.parametrize("name", list(LM_EVAL_TASKS))
def test_presets_equal_lm_eval(lm, lm_eval_samples, name):
    data, samples, results = lm_eval_samples
    ours, logged = run_preset(lm, name, data[name])
    theirs = sorted(samples[f"local_{name}"], key=lambda s: s["doc_id"])
    assert len(logged) == len(theirs) == ours["examples"]
    metric = {"truthfulqa_mc2": "mc2"}.get(name, "acc")
    for mine, ref in zip(logged, theirs):
        assert [tuple(r) for r in mine["requests"]] == [tuple(a) for a in ref["arguments"]]  # prompts, choices
        assert mine["loglikelihoods"] == pytest.approx([r[0] for r in ref["filtered_resps"]], rel=1e-4, abs=1e-3)
        assert mine[metric] == pytest.approx(ref["acc"], abs=1e-5)
        if "acc_norm" in ref:
            assert mine["acc_norm"] == ref["acc_norm"]
    assert ours[metric] == pytest.approx(results[f"local_{name}"]["acc,none"], abs=1e-6)
    if "acc_norm" in ours:
        assert ours["acc_norm"] == pytest.approx(results[f"local_{name}"]["acc_norm,none"], abs=1e-6)
    assert 0 < ours[f"{metric}_stderr"] < 0.5


def test_mmlu_equals_lm_eval_and_averages_subjects(lm, lm_eval_samples):
    data, samples, results = lm_eval_samples
    ours, logged = run_preset(lm, "mmlu", data["mmlu"])
    theirs = [s for subject in SUBJECTS for s in sorted(samples[f"local_mmlu_{subject}"], key=lambda s: s["doc_id"])]
    assert len(logged) == len(theirs) == 24
    for mine, ref in zip(logged, theirs):
        assert [tuple(r) for r in mine["requests"]] == [tuple(a) for a in ref["arguments"]]  # 5-shot from dev
        assert mine["acc"] == ref["acc"]
    per_subject = {s: [x["acc"] for x in samples[f"local_mmlu_{s}"]] for s in SUBJECTS}
    for s, accs in per_subject.items():
        assert ours[f"acc/{s}"] == pytest.approx(sum(accs) / len(accs))
        assert ours[f"acc/{s}"] == pytest.approx(results[f"local_mmlu_{s}"]["acc,none"])
    everything = [a for accs in per_subject.values() for a in accs]
    assert ours["acc"] == pytest.approx(sum(everything) / len(everything))  # micro (lm-eval's weight_by_size)
    assert ours["acc_macro"] == pytest.approx(sum(sum(a) / len(a) for a in per_subject.values()) / len(SUBJECTS))
    assert ours["acc/stem"] == ours["acc/abstract_algebra"] and ours["acc/humanities"] == ours["acc/world_religions"]


def test_subject_and_category_averages_equal_a_direct_computation():
    from llmctl.core.evaluate.metrics import aggregate, mean_stderr
    from llmctl.core.evaluate.sources import MMLU_CATEGORIES

    rng = random.Random(3)
    subjects = ["anatomy"] * 7 + ["virology"] * 3 + ["astronomy"] * 12 + ["philosophy"] * 5
    accs = [float(rng.random() < 0.4) for _ in subjects]
    out = aggregate({"acc": accs}, subjects, [[MMLU_CATEGORIES[s] for s in subjects]])
    assert len(MMLU_CATEGORIES) == 57 and set(MMLU_CATEGORIES.values()) == {"stem", "humanities", "social_sciences", "other"}
    by = {s: [a for a, t in zip(accs, subjects) if t == s] for s in set(subjects)}
    assert out["acc"] == pytest.approx(sum(accs) / len(accs))
    assert out["acc_stderr"] == pytest.approx(mean_stderr(accs))
    assert out["acc_macro"] == pytest.approx(sum(sum(v) / len(v) for v in by.values()) / 4)
    for s, v in by.items():
        assert out[f"acc/{s}"] == pytest.approx(sum(v) / len(v))
    stem = by["anatomy"] + by["astronomy"]
    assert out["acc/stem"] == pytest.approx(sum(stem) / len(stem))  # weighted by size, as lm-eval's mmlu_stem
    assert out["acc/other"] == out["acc/virology"] and out["acc/humanities"] == out["acc/philosophy"]
    assert "acc/stem_stderr" in out and "acc_macro_stderr" in out


def test_mmlu_original_csv_layout_reads_the_same(lm_eval_samples, tmp_path):
    """data.tar's headerless CSVs (letters as answers, subject from the file name) = cais/mmlu's JSONL."""
    from llmctl.core.evaluate.sources import BENCHMARKS

    data = lm_eval_samples[0]["mmlu"]
    for split in ("test", "dev"):
        for subject in SUBJECTS:
            rows = [json.loads(line) for line in (data / subject / f"{split}.jsonl").read_text().splitlines()]
            (tmp_path / split).mkdir(exist_ok=True)
            with open(tmp_path / split / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows([[r["question"], *r["choices"], "ABCD"[r["answer"]]] for r in rows])
    bench = BENCHMARKS.get("mmlu")
    for fewshot in (False, True):
        a = [d for _, d in bench.documents("mmlu", [str(data)], fewshot=fewshot)]
        b = [d for _, d in bench.documents("mmlu", [str(tmp_path)], fewshot=fewshot)]
        assert a == b and len(a) == (10 if fewshot else 24)


def test_other_published_layouts(tmp_path):
    """ARC's original JSONL, TruthfulQA's mc_task.json, CSV with a header, parquet; the
    MBPP full file keeps only its test split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmctl.core.evaluate.sources import BENCHMARKS

    write_jsonl(tmp_path / "ARC-Easy-Test.jsonl", [{"id": "x", "answerKey": "B", "question": {
        "stem": "Why?", "choices": [{"text": "no", "label": "A"}, {"text": "yes", "label": "B"}]}}])
    assert BENCHMARKS.get("arc_easy").documents("arc_easy", [str(tmp_path)]) == [
        (f"{tmp_path / 'ARC-Easy-Test.jsonl'}:1", {"question": "Why?", "choices": ["no", "yes"], "gold": 1})]
    assert not BENCHMARKS.get("arc_challenge").find(tmp_path, ("test",), True)  # Easy is not Challenge
    (tmp_path / "mc_task.json").write_text(json.dumps([{"question": "Q?", "mc1_targets": {"t": 1, "f": 0},
                                                        "mc2_targets": {"t1": 1, "t2": 1, "f": 0}}]))
    [(_, doc)] = BENCHMARKS.get("truthfulqa_mc2").documents("truthfulqa_mc2", [str(tmp_path / "mc_task.json")])
    assert doc == {"question": "Q?", "choices": ["t1", "t2", "f"], "labels": [1, 1, 0], "gold": 0}
    hf = [{"question": "Q?", "mc2_targets": {"choices": ["t1", "t2", "f"], "labels": [1, 1, 0]}}] * 2
    (tmp_path / "validation.json").write_text("".join(json.dumps(r) + "\n" for r in hf))  # datasets' to_json
    docs = BENCHMARKS.get("truthfulqa_mc2").documents("truthfulqa_mc2", [str(tmp_path / "validation.json")])
    assert [d for _, d in docs] == [doc, doc]
    rows = [{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "2"}]
    with open(tmp_path / "dev.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "validation.parquet")
    bench = BENCHMARKS.get("winogrande")
    from_csv = bench.documents("winogrande", [str(tmp_path / "dev.csv")])
    from_parquet = bench.documents("winogrande", [str(tmp_path / "validation.parquet")])
    assert [d for _, d in from_csv] == [d for _, d in from_parquet] == [
        {"contexts": ["A x", "A y"], "continuation": "b.", "gold": 1}]
    mbpp = [{"task_id": i, "text": "t", "code": "c", "test_list": ["assert 1"]} for i in (5, 11, 510, 511)]
    write_jsonl(tmp_path / "mbpp.jsonl", mbpp)
    assert [d["task_id"] for _, d in BENCHMARKS.get("mbpp").documents("mbpp", [str(tmp_path / "mbpp.jsonl")])] == [11, 510]


def test_parquet_without_pyarrow_says_which_extra(tmp_path, monkeypatch):
    import sys

    from llmctl.core.evaluate.sources import read_records
    from llmctl.errors import DataError

    (tmp_path / "test.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match=r"pip install 'llmctl\[parquet\]'"):
        read_records(tmp_path / "test.parquet")


def test_missing_data_names_files_and_where_published(llmctl, hf_dir, tmp_path):
    r = llmctl("eval", hf_dir, "--task", "mmlu", "--data", tmp_path, "--no-record")
    assert r.code == 1
    assert "SUBJECT_test.csv" in r.stderr and "huggingface.co/datasets/cais/mmlu" in r.stderr
    assert "downloads nothing" in r.stderr and "parameters" not in r.stderr  # before the model loads
    (tmp_path / "test").mkdir()
    write_jsonl(tmp_path / "test" / "x_test.jsonl", mmlu_rows(random.Random(0), "x", 2))
    r = llmctl("eval", hf_dir, "--task", "mmlu", "--data", tmp_path, "--no-record")
    assert r.code == 1 and "no few-shot data" in r.stderr and "parameters" not in r.stderr
    r = llmctl("eval", hf_dir, "--task", "word_order", "--data", tmp_path, "--no-record")
    assert r.code == 2 and "--data does not apply" in r.stderr


def test_cli_log_samples(llmctl, lm_eval_samples, hf_dir, tmp_path):
    data = lm_eval_samples[0]
    out = tmp_path / "samples.jsonl"
    r = llmctl("eval", hf_dir, "--task", "hellaswag", "--task", "winogrande", "--data", data["hellaswag"],
               "--data", data["winogrande"], "--limit", 5, "--log-samples", out, "--no-record", "--json")
    assert r.code == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["task"] for row in rows] == ["hellaswag"] * 5 + ["winogrande"] * 5
    assert all(row["checkpoint"] == str(hf_dir) and len(row["loglikelihoods"]) == len(row["requests"]) for row in rows)
    results = r.json()["results"][str(hf_dir)]
    assert results["hellaswag"]["acc"] == pytest.approx(sum(row["acc"] for row in rows[:5]) / 5)
    r = llmctl("eval", hf_dir, "--task", "hellaswag", "--data", data["hellaswag"], "--log-samples", out, "--no-record")
    assert r.code == 2 and "already exists" in r.stderr
    # --force replaces a samples file of ours, never another file or an input
    args = ["eval", hf_dir, "--task", "hellaswag", "--data", data["hellaswag"], "--limit", 2, "--no-record", "--force"]
    assert llmctl(*args, "--log-samples", out).code == 0 and len(out.read_text().splitlines()) == 2
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"mine": 1}\n')
    r = llmctl(*args, "--log-samples", notes)
    assert r.code == 2 and "not an llmctl samples output" in r.stderr and notes.read_text() == '{"mine": 1}\n'
    before = Path(data["hellaswag"]).read_bytes()
    r = llmctl(*args, "--log-samples", data["hellaswag"])
    assert r.code == 2 and "input" in r.stderr and Path(data["hellaswag"]).read_bytes() == before
    r = llmctl(*args, "--log-samples", "-")  # stdout: the records, the table on stderr
    assert r.code == 0 and [json.loads(line)["task"] for line in r.stdout.splitlines()] == ["hellaswag"] * 2
    r = llmctl(*args, "--log-samples", "-", "--json")
    assert r.code == 2 and r.stderr.strip() == ("error: --log-samples - and --json both write to stdout; "
                                                "give --log-samples a file")
    text = tmp_path / "text.txt"  # perplexity logs no samples: no empty file for --force to refuse later
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    r = llmctl("eval", hf_dir, "--task", "perplexity", "--data", text, "--no-record", "--log-samples",
               tmp_path / "none.jsonl")
    assert r.code == 0 and "no samples to log" in r.stderr and not (tmp_path / "none.jsonl").exists()


# ------------------------------------------------------------------------ GSM8K


def test_gsm8k_prompt_and_answer_extraction_equal_lm_eval(tmp_path):
    """The 8-shot CoT context lm-eval builds, and its strict-match filter + exact_match."""
    import lm_eval
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.tasks._yaml_loader import load_yaml

    from llmctl.core.evaluate.tasks import load_tasks

    rows = [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
            {"question": "What is 1,000 + 234?", "answer": "#### 1,234"}]
    write_jsonl(tmp_path / "test.jsonl", rows)
    task = load_tasks(["gsm8k_cot"], {"data": [str(tmp_path)]})[0]
    docs = task.documents()
    cfg = load_yaml(os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "gsm8k", "gsm8k-cot.yaml"))
    shots = cfg["fewshot_config"]["samples"]
    expected = "".join(f"Q: {s['question']}\nA: {s['target']}\n\n" for s in shots) + f"Q: {rows[0]['question']}\nA:"
    assert task.contexts(docs)[0] == expected
    assert [task.references(d) for d in docs] == [["7"], ["1,234"]]
    strict = cfg["filter_list"][0]["filter"][0]
    regex = RegexFilter(regex_pattern=strict["regex_pattern"], group_select=0)
    metric = {k: v for k, v in cfg["metric_list"][0].items() if k not in ("metric", "aggregation", "higher_is_better")}
    outputs = [" So 3 + 4 = 7. The answer is 7.", " The answer is $1,234.\n", " 7 is what I think", " The answer is 8. The answer is 7."]
    for text in outputs:
        [[theirs]] = regex.apply([[text]], [None])
        assert task.extract(text) == ("" if theirs == "[invalid]" else theirs)
        for ref in ("7", "1,234"):
            from llmctl.core.evaluate.metrics import exact_match

            hit = exact_match_hf_evaluate([theirs], [ref], **metric)["exact_match"]
            assert exact_match(task.extract(text), [ref], **vars(task.normalize)) == hit


def test_gsm8k_five_shot_from_train_equals_lm_eval(tmp_path):
    """lm-eval's gsm8k: 5 seeded draws from the train split per question, the worked solution
    as each example's answer, the same requests; "#### N" extraction and exact match."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.api.task import ConfigurableTask

    from llmctl.core.evaluate.metrics import exact_match
    from llmctl.core.evaluate.tasks import load_tasks

    rng = random.Random(1)
    train = [{"question": f"{words(rng, 4, 9)}?", "answer": f"{words(rng, 3, 8)}\n#### {rng.randint(0, 999):,}"}
             for _ in range(20)]
    test = [{"question": f"{words(rng, 4, 9)}?", "answer": f"{words(rng, 3, 8)}\n#### {rng.randint(0, 99)}"}
            for _ in range(6)]
    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", train)),
             "test": str(write_jsonl(tmp_path / "test.jsonl", test))}
    reference = ConfigurableTask(config=lm_eval_config("gsm8k/gsm8k.yaml", files))
    reference.set_fewshot_seed(1234)
    reference.build_all_requests(rank=0, world_size=1)
    task = load_tasks(["gsm8k"], {"data": [str(tmp_path)]})[0]
    docs = task.documents()
    assert task.contexts(docs) == [inst.arguments[0] for inst in sorted(reference.instances, key=lambda i: i.doc_id)]
    assert reference.instances[0].arguments[1]["until"] == task.until
    for doc in docs:
        ref = task.references(doc)[0]
        assert exact_match(task.extract(f" so {ref}\n#### {ref.split('#### ')[-1]}"), [ref], **vars(task.normalize)) == 1.0
        assert exact_match(task.extract(" no answer here"), [ref], **vars(task.normalize)) == 0.0
