"""Benchmark presets end to end: `llmctl eval`'s hellaswag and mmlu vs lm-evaluation-harness.

Writes a HellaSwag-shaped set (rowanz JSONL: activity label, two context halves, 4 endings cut
from the text) and an MMLU-shaped one (cais/mmlu JSONL: per subject, test questions and 5 dev
examples for the 5-shot prompt), then times, on the same random Llama checkpoint of
`benchmarks/eval.py` (built once in --dir):
  - lm-eval: `simple_evaluate` with its own hellaswag / mmlu_SUBJECT task YAMLs pointed at the
    files, HF backend (`HFLM` around the loaded transformers model, batch size 16);
  - llmctl: the `hellaswag` / `mmlu` presets' `task.run` on the loaded checkpoint (default batch).
Both time reading the files through to the metrics (model loading excluded), and separately
the scoring alone (the `loglikelihood` calls); they must agree on every per-document accuracy
(asserted). Alternating runs, best time kept.

    python -P benchmarks/lm_eval_presets.py --out benchmarks/results/lm_eval_presets.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.eval import DEFAULT_TEXT, build  # noqa: E402


def write_sets(root: Path, text: str, questions: int, subjects: int, seed: int = 0) -> dict[str, Path]:
    rng = random.Random(seed)
    words = text.split()

    def span(lo: int, hi: int) -> str:
        n = rng.randint(lo, hi)
        i = rng.randrange(len(words) - n)
        return " ".join(words[i : i + n])

    def jsonl(path: Path, rows: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    hs = [{"ind": i, "activity_label": span(1, 3), "ctx_a": span(40, 80), "ctx_b": span(3, 8),
           "endings": [span(8, 20) for _ in range(4)], "label": rng.randrange(4), "split": "val"}
          for i in range(questions)]
    jsonl(root / "hellaswag" / "hellaswag_val.jsonl", hs)
    names = [f"subject_{chr(97 + s)}" for s in range(subjects)]
    for name in names:
        for split, n in (("test", questions // subjects), ("dev", 5)):
            jsonl(root / "mmlu" / name / f"{split}.jsonl",
                  [{"question": span(10, 25) + "?", "subject": name, "choices": [span(2, 6) for _ in range(4)],
                    "answer": rng.randrange(4)} for _ in range(n)])
    return {"hellaswag": root / "hellaswag" / "hellaswag_val.jsonl", "mmlu": root / "mmlu", "subjects": names}


def lm_eval_configs(task: str, data: dict) -> list[dict]:
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    tasks = Path(os.path.dirname(lm_eval.__file__)) / "tasks"
    if task == "hellaswag":
        cfg = load_yaml(tasks / "hellaswag" / "hellaswag.yaml")
        cfg.update(dataset_path="json", dataset_name=None, training_split=None,
                   dataset_kwargs={"data_files": {"validation": str(data["hellaswag"])}})
        return [cfg]
    out = []
    for name in data["subjects"]:
        cfg = load_yaml(tasks / "mmlu" / "default" / "mmlu_abstract_algebra.yaml")
        files = {split: str(data["mmlu"] / name / f"{split}.jsonl") for split in ("test", "dev")}
        cfg.update(task=f"mmlu_{name}", dataset_path="json", dataset_name=None, num_fewshot=5,
                   description=f"The following are multiple choice questions (with answers) about {name.replace('_', ' ')}.\n\n",
                   dataset_kwargs={"data_files": files})
        out.append(cfg)
    return out


def timed(obj, method: str, spent: list[float]) -> None:
    """Add the wall time of each `obj.method` call to `spent[0]`."""
    inner = getattr(type(obj), method)

    def wrapper(*a, **kw):
        start = time.perf_counter()
        try:
            return inner(obj, *a, **kw)
        finally:
            spent[0] += time.perf_counter() - start
    setattr(obj, method, wrapper)


def run_lm_eval(hflm, task: str, data: dict) -> tuple[float, list[float]]:
    from lm_eval import simple_evaluate

    start = time.perf_counter()
    res = simple_evaluate(model=hflm, tasks=lm_eval_configs(task, data), bootstrap_iters=0, log_samples=True,
                          verbosity="ERROR")
    elapsed = time.perf_counter() - start
    names = ["hellaswag"] if task == "hellaswag" else [f"mmlu_{n}" for n in data["subjects"]]
    accs = [s["acc"] for n in names for s in sorted(res["samples"][n], key=lambda s: s["doc_id"])]
    return elapsed, accs


def run_llmctl(lm, task: str, data: dict) -> tuple[float, list[float]]:
    from llmctl.core.evaluate.tasks import load_tasks

    start = time.perf_counter()
    t = load_tasks([task], {"data": [str(data[task])]})[0]
    t.samples_log = []
    t.run(lm)
    return time.perf_counter() - start, [s["acc"] for s in t.samples_log]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llmctl-bench-eval"))
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    from llmctl.core.evaluate.runner import load_scorer
    from llmctl.runtime import options, tune_allocator

    options.quiet = True
    tune_allocator()
    text = args.text.read_text(encoding="utf-8")[:200_000]
    build(args.dir, args.text, 8192, 256, 4, 512)
    data = write_sets(args.dir / "sets", text, args.questions, args.subjects)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32).eval()
    hflm = HFLM(pretrained=model, tokenizer=transformers.AutoTokenizer.from_pretrained(args.dir), batch_size=16,
                max_length=512)
    lm = load_scorer(args.dir, device=torch.device("cpu"), dtype=torch.float32)
    scoring_theirs, scoring_ours = [0.0], [0.0]
    timed(hflm, "loglikelihood", scoring_theirs)
    timed(lm, "loglikelihood", scoring_ours)
    rows = []
    for task in ("hellaswag", "mmlu"):
        theirs, ours = [], []
        for _ in range(args.repeat + 1):  # the first of each is a warm-up (datasets' cache, allocator)
            scoring_theirs[0] = scoring_ours[0] = 0.0
            t, ref = run_lm_eval(hflm, task, data)
            theirs.append((t, scoring_theirs[0]))
            t, mine = run_llmctl(lm, task, data)
            ours.append((t, scoring_ours[0]))
            assert mine == ref, f"{task}: per-document accuracies differ"
        (x, xs), (y, ys) = min(theirs[1:]), min(ours[1:])
        rows.append((task, len(ref), sum(ref) / len(ref), x, y, xs, ys))
        print(rows[-1], file=sys.stderr)
    command = "python -P benchmarks/lm_eval_presets.py " + shlex.join(sys.argv[1:])
    lines = [f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M')}, load average "
             f"{os.getloadavg()[0]:.1f}, {platform.machine()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads)", "",
             "| set | documents | acc (both) | lm-eval s | llmctl s | speed-up | lm-eval scoring s | llmctl scoring s "
             "| scoring speed-up |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {t} | {n} | {a:.3f} | {x:.2f} | {y:.2f} | {x / y:.2f}x | {xs:.2f} | {ys:.2f} | {xs / ys:.2f}x |"
              for t, n, a, x, y, xs, ys in rows]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
