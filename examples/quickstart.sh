#!/usr/bin/env bash
# llmctl quickstart: from nothing to a trained, sampled and evaluated language model.
#
#   bash examples/quickstart.sh [OUTDIR]          (default: runs/quickstart)
#
# Each step is one llmctl command whose output directory the next step reads — the same
# commands you would chain in your own scripts. Run it again at any time: finished steps are
# reused, and an interrupted training run (Ctrl-C is safe) resumes from its last checkpoint.
#
# Knobs (environment variables): QUICKSTART_MINUTES (training budget, default 4),
# QUICKSTART_VOCAB (tokenizer size, default 2048), QUICKSTART_TRAIN (extra key=value overrides
# for the training recipe configs/train/quickstart.yaml) and QUICKSTART_EVAL (extra eval flags).
set -euo pipefail

OUT=${1:-runs/quickstart}
MINUTES=${QUICKSTART_MINUTES:-4}
VOCAB=${QUICKSTART_VOCAB:-2048}
read -r -a TRAIN_OVERRIDES <<< "${QUICKSTART_TRAIN:-}"
read -r -a EVAL_FLAGS <<< "${QUICKSTART_EVAL:-}"
START=$SECONDS
mkdir -p "$OUT"

step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
reuse() { printf 'reusing %s (finished earlier)\n' "$1" >&2; }

# 1. A corpus that needs no download: the English documentation that ships inside every
#    CPython (pydoc_data.topics, ~465 KB). Every tenth topic is held out for evaluation.
step "1/7 corpus: Python's own documentation"
if [ -f "$OUT/val.txt" ]; then reuse "$OUT/corpus.txt"; else
  python3 - "$OUT" <<'PY'
import os, sys
from pydoc_data.topics import topics

out = sys.argv[1]
names = sorted(topics)
for path, keep in (("corpus.txt", lambda i: i % 10), ("val.txt", lambda i: not i % 10)):
    text = "\n\n".join(topics[n].strip() for i, n in enumerate(names) if keep(i)) + "\n"
    with open(os.path.join(out, path + ".tmp"), "w", encoding="utf-8") as f:
        f.write(text)
for path in ("corpus.txt", "val.txt"):  # val.txt last: it marks the step as finished
    os.replace(os.path.join(out, path + ".tmp"), os.path.join(out, path))
PY
  wc -c "$OUT/corpus.txt" "$OUT/val.txt" >&2
fi

# 2. A byte-level BPE tokenizer (no unknown tokens, ever) with a ChatML chat template.
#    Like every llmctl output, the directory appears only once it is complete.
step "2/7 tokenizer"
if [ -d "$OUT/tokenizer" ]; then reuse "$OUT/tokenizer"; else
  llmctl tokenize train "$OUT/corpus.txt" -o "$OUT/tokenizer" --algo bytelevel --vocab-size "$VOCAB" --chat-template chatml
fi

# 3. Token shards: flat uint16 files plus a manifest, memory-mapped by training; 5% of the
#    documents go to a validation split that training evaluates every few steps.
step "3/7 encode"
if [ -d "$OUT/tokens" ]; then reuse "$OUT/tokens"; else
  llmctl tokenize encode "$OUT/corpus.txt" --tokenizer "$OUT/tokenizer" -o "$OUT/tokens" --val-fraction 0.05
fi

# 4. The untrained model (max_steps=0), kept to show what training changed.
step "4/7 initial model"
if [ -f "$OUT/init/config.json" ]; then reuse "$OUT/init"; else
  llmctl train --config quickstart data="$OUT/tokens" "${TRAIN_OVERRIDES[@]}" max_steps=0 -o "$OUT/init"
fi

# 5. Training for a fixed wall-clock budget (max_time, in minutes). Checkpoints land in
#    $OUT/model/checkpoints/ every 100 steps; at the end $OUT/model is itself a checkpoint
#    (config.json, model.safetensors, tokenizer, llmctl.json with the lineage).
#    --resume: continue an interrupted run, or start one if there is none.
step "5/7 train (${MINUTES} min)"
if [ -f "$OUT/model/config.json" ]; then reuse "$OUT/model"; else
  llmctl train --config quickstart data="$OUT/tokens" max_time="$MINUTES" "${TRAIN_OVERRIDES[@]}" -o "$OUT/model" --resume
fi

# 6. Samples: one JSON object per prompt (text, token ids, finish reason, speed).
step "6/7 generate"
if [ -f "$OUT/samples.jsonl" ]; then reuse "$OUT/samples.jsonl"; else
  printf '%s\n' '{"prompt": "The "}' '{"prompt": "A class is"}' '{"prompt": "def "}' > "$OUT/prompts.jsonl"
  llmctl generate "$OUT/model" --input "$OUT/prompts.jsonl" --max-new-tokens 48 \
         --temperature 0.8 --top-p 0.95 --repetition-penalty 1.1 --seed 0 --json > "$OUT/samples.jsonl.tmp"
  mv "$OUT/samples.jsonl.tmp" "$OUT/samples.jsonl"
fi

# 7. Evaluation, side by side: perplexity on the held-out topics and a built-in
#    multiple-choice task (is this sentence in the right word order?). The results are also
#    appended to each checkpoint's llmctl.json (see: llmctl info $OUT/model).
step "7/7 evaluate"
if [ -f "$OUT/eval.json" ]; then reuse "$OUT/eval.json"; else
  llmctl eval "$OUT/init" "$OUT/model" --task perplexity --data "$OUT/val.txt" --task word_order "${EVAL_FLAGS[@]}" --json > "$OUT/eval.json.tmp"
  mv "$OUT/eval.json.tmp" "$OUT/eval.json"
fi

# The summary: everything above, read back from the files the steps wrote.
python3 - "$OUT" "$((SECONDS - START))" <<'PY'
import json, sys
from pathlib import Path
from rich.console import Console
from rich.table import Table

out, seconds = Path(sys.argv[1]), int(sys.argv[2])
results = json.loads((out / "eval.json").read_text())["results"]
before, after = results[str(out / "init")], results[str(out / "model")]
lineage = json.loads((out / "model" / "llmctl.json").read_text())
cfg = lineage["config"]
steps = max(json.loads(line).get("step", 0) for line in (out / "model" / "metrics.jsonl").read_text().splitlines())
tokens = steps * cfg["batch_size"] * cfg["seq_len"] * cfg["grad_accum"]
samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
prompts = [json.loads(line)["prompt"] for line in (out / "prompts.jsonl").read_text().splitlines()]

table = Table(title="llmctl quickstart", show_header=False, title_justify="left")
table.add_column(style="bold")
table.add_column()
table.add_row("tokens trained", f"{tokens:,} ({steps} steps)")
table.add_row("val perplexity", f"{before['perplexity']['perplexity']:,.1f} → {after['perplexity']['perplexity']:,.1f}")
table.add_row("word order acc", f"{before['word_order']['acc']:.3f} → {after['word_order']['acc']:.3f}")
for prompt, sample in zip(prompts, samples):
    table.add_row("sample", repr(prompt + sample["text"]))
table.add_row("outputs", "\n".join(str(out / p) for p in ("tokenizer", "tokens", "init", "model", "samples.jsonl", "eval.json")))
table.add_row("this run took", f"{seconds // 60} min {seconds % 60} s")
Console().print(table)
print(f"next: llmctl info {out / 'model'}   llmctl plot {out / 'model'}   llmctl generate {out / 'model'} --chat")
PY
