"""Pruning quality, time and memory on a briefly trained `llama`-preset model (Tiny Shakespeare).

Trains the `llama` preset's architecture at a smaller width (8 layers, d=128, 4 heads / 2 KV
heads, SwiGLU 384, byte-level BPE 1024) for at most `--minutes` on the first 90 % of Tiny
Shakespeare (the schedule fitted to the time: `max_time`), then prunes it
with every method through `llmctl prune … --json` (one process each: its time and peak RSS) and
measures held-out perplexity on the last 10 %. The layer-pruned model is also briefly retrained
(`llmctl train model=PRUNED`) to show the recovery. Every command runs on one thread
(OMP_NUM_THREADS=1 unless set). Writes benchmarks/results/prune.md.

    python -P benchmarks/prune.py [--steps 600] [--minutes 5] [--recovery-steps 100] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
MODEL = {"hidden_size": 128, "num_layers": 8, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 384,
         "max_seq_len": 256, "vocab_size": 1024}
TRAIN = ["batch_size=16", "seq_len=128", "lr=3e-3", "min_lr=3e-4", "warmup_steps=30", "eval_every=0",
         "save_every=0", "tensorboard=false", "peak_tflops=1"]
RUNS = [  # (label, prune arguments)
    ("magnitude 50 %", ["--method", "magnitude", "--sparsity", "0.5"]),
    ("wanda 50 %", ["--method", "wanda", "--sparsity", "0.5"]),
    ("sparsegpt 50 %", ["--method", "sparsegpt", "--sparsity", "0.5"]),
    ("magnitude 2:4", ["--method", "magnitude", "--pattern", "2:4"]),
    ("wanda 2:4", ["--method", "wanda", "--pattern", "2:4"]),
    ("sparsegpt 2:4", ["--method", "sparsegpt", "--pattern", "2:4"]),
    ("heads 50 % (1 of 2 KV groups)", ["--method", "heads", "--sparsity", "0.5"]),
    ("channels 25 %", ["--method", "channels", "--sparsity", "0.25"]),
    ("layers 25 % (ShortGPT)", ["--method", "layers", "--sparsity", "0.25"]),
]


def llmctl(*args, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # 1 thread: on a shared,
    # oversubscribed 2-core box two spinning threads ran 15x slower than one
    proc = subprocess.run([sys.executable, "-m", "llmctl", *map(str, args)], capture_output=True, text=True, env=env)
    if check and proc.returncode:
        raise SystemExit(f"llmctl {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    return proc


def perplexity(ckpt: Path, val: Path) -> float:
    out = llmctl("eval", ckpt, "--task", "perplexity", "--data", val, "--no-record", "--json")
    return json.loads(out.stdout)["results"][str(ckpt)]["perplexity"]["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--minutes", type=float, default=5.0, help="training time budget (max_time)")
    parser.add_argument("--recovery-steps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmctl-prune-bench"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prune.md")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    text = DATA.read_text(encoding="utf-8")
    cut = text.rindex("\n\n", 0, int(len(text) * 0.9))
    train, val = work / "train.txt", work / "val.txt"
    train.write_text(text[:cut], encoding="utf-8")
    val.write_text(text[cut:], encoding="utf-8")

    base, tok = work / "base", work / "tok"
    if not (tok / "tokenizer.json").is_file():
        llmctl("tokenize", "train", train, "--algo", "bytelevel", "--vocab-size", MODEL["vocab_size"], "-o", tok)
    started = time.perf_counter()
    if not (base / "config.json").is_file():
        model_args = "{" + ", ".join(f"{k}: {v}" for k, v in MODEL.items()) + "}"
        llmctl("train", "model=llama", f"model_args={model_args}", f"data={train}", f"val_data={val}",
               f"tokenizer={tok}", f"max_steps={args.steps}", f"max_time={args.minutes}", *TRAIN, "-o", base, "--force")
    train_s = time.perf_counter() - started
    steps = json.loads((base / "llmctl.json").read_text())["step"]
    rows = [("dense", perplexity(base, val), None, None, None)]
    calibration = ["--calibration", train, "--samples", args.samples]
    for label, prune_args in RUNS:
        out = work / label.split(" (")[0].replace(" ", "-").replace("%", "pc").replace(":", "-")
        proc = llmctl("prune", base, *prune_args, *calibration, "-o", out, "--force", "--json", check=False)
        if proc.returncode:
            rows.append((label, None, None, None, proc.stderr.strip().splitlines()[-1]))
            continue
        report = json.loads(proc.stdout)
        kept = report["parameters"]["after"] / report["parameters"]["before"]
        note = f"{kept:.0%} of the parameters" if kept < 1 else f"{report['sparsity']['achieved']:.0%} zeros in place"
        rows.append((label, perplexity(out, val), report["seconds"], report["peak_rss_bytes"], note))
        if label.startswith("layers"):
            recovered = work / "layers-recovered"
            llmctl("train", f"model={out}", f"data={train}", f"val_data={val}", f"max_steps={args.recovery_steps}",
                   *TRAIN, "lr=1e-3", "warmup_steps=10", "-o", recovered, "--force")
            rows.append((f"{label} + {args.recovery_steps} steps of training", perplexity(recovered, val),
                         None, None, "full-weight recovery"))
    lines = [f"Model: `llama` preset at d={MODEL['hidden_size']}, {MODEL['num_layers']} layers, "
             f"{MODEL['num_heads']} heads / {MODEL['num_kv_heads']} KV heads, SwiGLU {MODEL['intermediate_size']}, "
             f"vocab {MODEL['vocab_size']}; {steps} steps of 16 × 128 tokens ({train_s / 60:.1f} min). "
             f"Calibration: {args.samples} windows of 256 tokens from the training text; perplexity on the "
             "held-out last 10 % (`llmctl eval --task perplexity`).", "",
             "| model | val perplexity | prune time (s) | peak RSS (MiB) | note |", "|---|---:|---:|---:|---|"]
    for label, ppl, seconds, rss, note in rows:
        cells = [label, f"{ppl:.2f}" if ppl else "–", f"{seconds:.1f}" if seconds is not None else "",
                 f"{rss / 2**20:.0f}" if rss else "", note or ""]
        lines.append("| " + " | ".join(cells) + " |")
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
