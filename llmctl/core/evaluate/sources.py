"""The public benchmarks' files, read from local copies (`--data DIR|FILE`; nothing is downloaded).

`read_records` reads JSONL (also .gz), JSON (a list, or {"data": list}), CSV and parquet (the
`parquet` extra: pyarrow). A `Benchmark` names the files of its evaluated and few-shot splits
(by the words in their paths: `validation`, `test`, `dev`, …) and turns each raw row into the
document fields its task preset (`configs/eval/NAME.yaml`) formats, with lm-evaluation-harness's
preprocessing. Tasks select one with `dataset: {benchmark: NAME}`.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmctl.core.registry import Registry
from llmctl.errors import DataError

Doc = tuple[str, dict]
FORMATS = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")


def read_records(path: Path, columns: tuple[str, ...] | None = None) -> list[Doc]:
    """(where, row) for every row of a JSONL/JSON/CSV/parquet file; `columns` names the
    fields of a CSV without a header row."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        from llmctl.core.data.corpus import parse_jsonl

        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            return [(f"{path}:{n}", row) for n, row in parse_jsonl(f, path)]
    if name.endswith(".json"):
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except ValueError as exc:
            if text.lstrip().startswith("{") and "\n" in text.strip():  # JSON Lines named .json (datasets' to_json)
                from llmctl.core.data.corpus import parse_jsonl

                return [(f"{path}:{n}", row) for n, row in parse_jsonl(text.splitlines(), path)]
            raise DataError(f"{path}: invalid JSON ({exc})") from None
        rows = data.get("data") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
        return [(f"{path}:[{i}]", row) for i, row in enumerate(rows)]
    if name.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f) if columns else csv.DictReader(f)
            rows = [dict(zip(columns, r)) if columns else r for r in reader]
        return [(f"{path}:{i + 1 + (columns is None)}", row) for i, row in enumerate(rows)]
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow: pip install 'llmctl[parquet]' "
                            "(or convert the file to JSONL)") from None
        return [(f"{path}:{i + 1}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    raise DataError(f"{path}: unknown data format (expected {', '.join(FORMATS)})")


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark's splits are and how a raw row becomes a document."""

    splits: tuple[str, ...]  # words in the evaluated split's file paths
    files: str  # the expected files, for the error message
    published: str  # where they are published
    convert: Callable[[dict, Path], dict | None]  # raw row, its file → document fields (None: skip)
    fewshot_splits: tuple[str, ...] = ()
    require: tuple[str, ...] = ()  # words every file path must also contain
    csv_columns: tuple[str, ...] | None = None  # CSV files without a header row

    def documents(self, name: str, data: list[str], fewshot: bool = False) -> list[Doc]:
        words = self.fewshot_splits if fewshot else self.splits
        alone = len(data) == 1 and not fewshot  # one FILE is the evaluated split, whatever its name
        files = [f for root in data for f in self.find(Path(root), words, alone)]
        if not files:
            kind = "few-shot" if fewshot else "evaluation"
            given = ", ".join(data) if data else "nothing (use --data DIR|FILE)"
            raise DataError(f"task {name}: no {kind} data in {given}; expected {self.files} "
                            f"(published at {self.published}; llmctl downloads nothing)")
        docs = []
        for path in files:
            for where, row in read_records(path, self.csv_columns):
                try:
                    fields = self.convert(row, path)
                except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                    raise DataError(f"{where}: not a {name} row ({type(exc).__name__}: {exc})") from None
                if fields is not None:
                    docs.append((where, fields))
        return docs

    def find(self, root: Path, words: tuple[str, ...], alone: bool = False) -> list[Path]:
        """The data files under `root` (or `root` itself) whose path has one of `words` and
        every word of `require`; a file given `alone` is taken as it is."""
        if root.is_file():
            paths, base = [root], root.parent
            if alone:
                return paths
        else:
            paths, base = (sorted(root.rglob("*")) if root.is_dir() else []), root
        found = []
        for path in paths:
            tokens = set(re.split(r"[/_\-.\s]+", str(path.relative_to(base)).lower()))
            if (path.is_file() and path.name.lower().endswith(FORMATS) and tokens & set(words)
                    and tokens >= set(self.require)):
                found.append(path)
        return found


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def _register(name: str, **kw) -> Callable:
    def wrap(convert: Callable) -> Callable:
        BENCHMARKS.register(name)(Benchmark(convert=convert, **kw))
        return convert
    return wrap


# ---------------------------------------------------------------------------- MMLU
LETTERS = "ABCD"
MMLU_CATEGORIES = {subject: category for category, subjects in {  # lm-eval's mmlu_stem, … groups
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
                       "professional_psychology public_relations security_studies sociology us_foreign_policy",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}.items() for subject in subjects.split()}


@_register("mmlu", splits=("test",), fewshot_splits=("dev",),
           files="DIR/test/SUBJECT_test.csv and DIR/dev/SUBJECT_dev.csv (the original data.tar), or test and dev "
                 "JSONL/parquet files with question, subject, choices, answer (cais/mmlu)",
           published="https://people.eecs.berkeley.edu/~hendrycks/data.tar and "
                     "https://huggingface.co/datasets/cais/mmlu",
           csv_columns=("question", "A", "B", "C", "D", "answer"))
def mmlu(row: dict, path: Path) -> dict:
    """{subject, category, question, choices, answer (index)}; the subject from the row or the
    file name, its category as lm-eval groups them (`uncategorized` for other subjects)."""
    if "choices" in row:
        choices, answer = list(row["choices"]), row["answer"]
    else:
        choices, answer = [row[c] for c in LETTERS], row["answer"]
    if isinstance(answer, str) and answer.strip() in tuple(LETTERS):  # one letter: "" and "AB" are in "ABCD" too
        answer = LETTERS.index(answer.strip())
    subject = row.get("subject") or re.sub(r"_(test|dev|val)$", "", path.name.split(".")[0])
    return {"subject": subject, "category": MMLU_CATEGORIES.get(subject, "uncategorized"), "question": row["question"],
            "choices": choices, "answer": int(answer)}


# ---------------------------------------------------------------------------- HellaSwag
def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text clean-up (WikiHow's bracket artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


@_register("hellaswag", splits=("val", "validation"), fewshot_splits=("train",),
           files="hellaswag_val.jsonl (or validation parquet/JSONL with activity_label, ctx_a, ctx_b, endings, label)",
           published="https://github.com/rowanz/hellaswag/tree/master/data and "
                     "https://huggingface.co/datasets/Rowan/hellaswag")
def hellaswag(row: dict, path: Path) -> dict:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"query": hellaswag_preprocess(row["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(e) for e in row["endings"]], "gold": int(row["label"])}


# ---------------------------------------------------------------------------- ARC
def arc(row: dict, path: Path) -> dict:
    """The ARC JSONL layout ({question: {stem, choices: [{text, label}]}}) or allenai/ai2_arc's."""
    question = row["question"]
    if isinstance(question, dict):
        texts, labels = [c["text"] for c in question["choices"]], [c["label"] for c in question["choices"]]
        question = question["stem"]
    else:
        texts, labels = list(row["choices"]["text"]), list(row["choices"]["label"])
    return {"question": question, "choices": texts, "gold": labels.index(row["answerKey"])}


for _level in ("easy", "challenge"):
    _register(f"arc_{_level}", splits=("test",), fewshot_splits=("train",), require=(_level,),
              files=f"ARC-{_level.capitalize()}-Test.jsonl (or test parquet/JSONL of ARC-{_level.capitalize()})",
              published="https://allenai.org/data/arc and https://huggingface.co/datasets/allenai/ai2_arc")(arc)


# ---------------------------------------------------------------------------- WinoGrande
@_register("winogrande", splits=("dev", "validation"), fewshot_splits=("train",),
           files="dev.jsonl of winogrande_1.1 (or validation parquet/JSONL with sentence, option1, option2, answer)",
           published="https://winogrande.allenai.org and https://huggingface.co/datasets/allenai/winogrande")
def winogrande(row: dict, path: Path) -> dict:
    """lm-eval's partial scoring: one context per option (the sentence up to the blank), one
    shared continuation (the rest)."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    return {"contexts": [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]],
            "continuation": sentence[blank + 1 :].strip(), "gold": int(row["answer"]) - 1}


# ---------------------------------------------------------------------------- TruthfulQA
def _targets(value) -> tuple[list[str], list[int]]:
    if "choices" in value:  # truthfulqa/truthful_qa: {choices: [...], labels: [...]}
        return list(value["choices"]), [int(x) for x in value["labels"]]
    return list(value), [int(x) for x in value.values()]  # mc_task.json: {choice: label}


def truthfulqa(key: str) -> Callable[[dict, Path], dict]:
    def convert(row: dict, path: Path) -> dict:
        choices, labels = _targets(row[key])
        return {"question": row["question"], "choices": choices, "labels": labels, "gold": labels.index(1)}
    return convert


for _mc in ("mc1", "mc2"):
    _register(f"truthfulqa_{_mc}", splits=("validation", "mc", "truthfulqa"),
              files="mc_task.json (or validation parquet/JSONL of the multiple_choice config)",
              published="https://github.com/sylinrl/TruthfulQA/tree/main/data and "
                        "https://huggingface.co/datasets/truthfulqa/truthful_qa")(truthfulqa(f"{_mc}_targets"))


# ---------------------------------------------------------------------------- GSM8K
@_register("gsm8k", splits=("test",), fewshot_splits=("train",),
           files="test.jsonl (and train.jsonl for few-shot from the train split) with question, answer",
           published="https://github.com/openai/grade-school-math/tree/master/grade_school_math/data and "
                     "https://huggingface.co/datasets/openai/gsm8k")
def gsm8k(row: dict, path: Path) -> dict:
    """{question, answer (the worked solution), target (the final number after '####')}."""
    return {"question": row["question"], "answer": row["answer"], "target": row["answer"].split("####")[-1].strip()}


# ---------------------------------------------------------------------------- code
@_register("humaneval", splits=("humaneval", "test"),
           files="HumanEval.jsonl.gz (or test parquet/JSONL with task_id, prompt, test, entry_point)",
           published="https://github.com/openai/human-eval/tree/master/data and "
                     "https://huggingface.co/datasets/openai/openai_humaneval")
def humaneval(row: dict, path: Path) -> dict:
    return {k: row[k] for k in ("task_id", "prompt", "test", "entry_point")}


MBPP_TEST_IDS = range(11, 511)  # the test split of the full mbpp.jsonl (task ids 11-510)


@_register("mbpp", splits=("mbpp", "test"),
           files="mbpp.jsonl (all 974 problems: the test split, task ids 11-510, is selected) or test "
                 "parquet/JSONL with task_id, text, code, test_list",
           published="https://github.com/google-research/google-research/tree/master/mbpp and "
                     "https://huggingface.co/datasets/google-research-datasets/mbpp")
def mbpp(row: dict, path: Path) -> dict | None:
    if "test" not in path.name.lower() and int(row["task_id"]) not in MBPP_TEST_IDS:
        return None
    return {"task_id": row["task_id"], "text": row["text"], "code": row["code"], "test_list": list(row["test_list"]),
            "test_setup_code": row.get("test_setup_code", "")}
