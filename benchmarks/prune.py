"""Pruning quality, time and memory on a briefly trained `llama`-preset model (benchmarks/trained.py).

Prunes the model with every method through `llmctl prune … --json` (one process each: its time
and peak RSS) and measures held-out perplexity. The layer-pruned model is then recovered with
the same step budget twice: full training (`llmctl train model=PRUNED`) and LoRA (`llmctl
finetune PRUNED --config finetune/prune-recovery`), and the SparseGPT 2:4 model quantized to int4
g128 (RTN; GPTQ keeping its zeros, and with `gptq.keep_zeros=false`; `--llmcompressor PYTHON`: also
llm-compressor's RTN and GPTQ on the same windows), with each one's KL divergence from the 2:4 model.
Also measured: the spread of the input feature norms ‖X_j‖ (max / median per linear, on the
calibration windows), which is what Wanda's |W|·‖X_j‖ score adds to magnitude's |W|. Writes benchmarks/results/prune-d<width>.md
(`--outliers C`: on the model with LLM-style activation outliers of benchmarks/outliers.py,
prune-d<width>-outliers<C>.md).

    python -m benchmarks.prune [--width 128 --layers 8 --steps 1200 | --pretrained CKPT] [--recovery-steps 100] [--dir DIR]

`--pretrained CKPT` measures a checkpoint made elsewhere (e.g. SmolLM2-135M: benchmarks/gguf_to_hf.py) and writes
prune-<its name>.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks import outliers
from benchmarks.trained import Settings, Trained, add_arguments, from_arguments, llmctl

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
SEQ_LEN = 256  # calibration window (prune's default)
INPUTS = {"q/k/v": "self_attn.q_proj", "o": "self_attn.o_proj", "gate/up": "mlp.gate_proj", "down": "mlp.down_proj"}


def input_spread(t: Trained, samples: int) -> dict[str, list[float]]:
    """max_j ‖X_j‖ / median_j ‖X_j‖ of each block's linear inputs (per kind of input, one value
    per layer) on the dense model, over the calibration windows `llmctl prune` draws."""
    import torch

    from llmctl.core.model.io import load_model
    from llmctl.core.model.layerwise import capture_inputs
    from llmctl.core.prune.calibration import calibration_tokens, for_each_block
    from llmctl.core.prune.unstructured import InputNorms
    from llmctl.core.tokenizer import load_tokenizer

    model, _ = load_model(t.model)
    tokens = calibration_tokens([str(t.train)], load_tokenizer(t.model), samples=samples, seq_len=SEQ_LEN)
    spread: dict[str, list[float]] = {kind: [] for kind in INPUTS}

    def visit(i, block, inputs, ctx) -> None:
        stats = {p: InputNorms(block.get_submodule(p)) for p in INPUTS.values()}
        with capture_inputs(block, lambda p, x: stats[p].add(x) if p in stats else None):
            block(inputs, ctx)
        for kind, p in INPUTS.items():
            norms = stats[p].sq.sqrt()
            spread[kind].append(float(norms.max() / norms.median()))

    with torch.no_grad():
        for_each_block(model, tokens, visit)
    return spread


def recover(pruned: Path, t: Trained, steps: int, work: Path) -> list[tuple]:
    """Rows for `pruned` after `steps` of full training and of LoRA (prune-recovery recipe), same batches."""
    records = work / "train.jsonl"  # the training text in records of ≥ 4,000 characters cut at paragraphs: a
    # window rarely crosses a document end (EOS), as in the raw text `train` and the evaluation read
    chunks, text = [], t.train.read_text(encoding="utf-8")
    while text:
        end = text.find("\n\n", 4000)
        cut = len(text) if end < 0 else end + 2
        chunks.append(text[:cut])
        text = text[cut:]
    records.write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks), encoding="utf-8")
    s = t.settings or Settings()  # a pretrained model recovers with the default batches
    budget = [f"max_steps={steps}", f"batch_size={s.batch_size}", f"seq_len={s.seq_len}", "lr=1e-3", "min_lr=3e-4",
              "warmup_steps=10", "eval_every=0", "save_every=0", "tensorboard=false", "peak_tflops=1"]
    full, lora = work / f"{pruned.name}-full", work / f"{pruned.name}-lora"
    llmctl("train", f"model={pruned}", f"data={t.train}", f"val_data={t.val}", *budget, "-o", full, "--force")
    llmctl("finetune", pruned, "--config", "prune-recovery", "--data", records, *budget, "-o", lora, "--force")
    return [(f"… + {steps} steps of full training", t.perplexity(full), None, None, "recovery: every weight"),
            (f"… + {steps} steps of LoRA (r 16, all linears)", t.perplexity(lora), None, None,
             "recovery: `finetune --config prune-recovery`")]


QUANTIZED = [  # (label, output name, quantize arguments): int4 g128 after SparseGPT 2:4
    ("… + int4 g128 RTN", "rtn", ["-m", "int4"]),
    ("… + GPTQ int4 g128", "gptq", ["-m", "gptq"]),
    ("… + GPTQ int4 g128 act-order", "gptq-act-order", ["-m", "gptq", "gptq.act_order=true"]),
    ("… + GPTQ int4 g128, gptq.keep_zeros=false", "gptq-free", ["-m", "gptq", "gptq.keep_zeros=false"]),
]


LLMCOMPRESSOR = {  # 0.14's GPTQModifier orders columns by activation ("static" act-order) by default
    "… + llm-compressor's W4A16 RTN": ("rtn", "W4A16"), "… + llm-compressor's W4A16 GPTQ": ("gptq", "W4A16")}


def quantized(pruned: Path, t: Trained, samples: int, work: Path, python: str | None) -> list[tuple]:
    """Rows for the 2:4 model quantized to int4 g128 (RTN, GPTQ keeping its zeros or not; with `python`,
    llm-compressor's RTN and GPTQ on the same windows too), each noting its KL divergence from the 2:4
    model on held-out text and whether the 2:4 pattern survived."""
    from dataclasses import replace

    from benchmarks.quantize import held_out_kl, llmcompressor_rows
    from llmctl.core.model.io import load_model
    from llmctl.core.prune.run import model_sparsity

    sparse = replace(t, model=pruned)
    kl, rows, sha256 = held_out_kl(sparse), [], None
    calibration = ["--calibration", t.train, "--samples", samples, "--seq-len", SEQ_LEN]

    def note(path: Path, divergence: float) -> str:
        zeros, holds = model_sparsity(load_model(path)[0], "2:4")
        return f"KL {divergence:.2e}; {zeros:.1%} zeros, " + ("still 2:4" if holds else "2:4 lost")

    for label, name, args in QUANTIZED:
        out = work / f"{pruned.name}-{name}"
        report = json.loads(llmctl("quantize", pruned, *args, "--bits", 4, "--group-size", 128, "-o", out, "--force",
                                   "--json", *(calibration if args[1] == "gptq" else [])).stdout)
        sha256 = report["quantization"].get("calibration", {}).get("sha256", sha256)
        rows.append((label, t.perplexity(out), report["seconds"], report["peak_rss_mb"] * 2**20, note(out, kl(out))))
    if python:
        for name, ppl, divergence, seconds in llmcompressor_rows(python, sparse, work, calibration, sha256, kl,
                                                                 LLMCOMPRESSOR):
            rows.append((name, ppl, seconds, None, note(work / name.replace(" ", "_"), divergence)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--recovery-steps", type=int, default=100, help="0: no recovery rows")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows of 256 tokens")
    parser.add_argument("--no-quantize", dest="quantize", action="store_false",
                        help="no rows for the SparseGPT 2:4 model quantized to int4")
    parser.add_argument("--llmcompressor", metavar="PYTHON",
                        help="a venv's python with llmcompressor: its RTN and GPTQ on the 2:4 model too "
                             "(benchmarks/llmcompressor_anchor.py)")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/prune-d<width>.md")
    args = parser.parse_args()
    t = from_arguments(args)
    work = t.model.parent / "prune"
    work.mkdir(exist_ok=True)
    dense = t.perplexity(t.model)
    rows = [("dense", dense, None, None, None)]
    calibration = ["--calibration", t.train, "--samples", args.samples]
    for label, prune_args in RUNS:
        out = work / label.split(" (")[0].replace(" ", "-").replace("%", "pc").replace(":", "-")
        proc = llmctl("prune", t.model, *prune_args, *calibration, "-o", out, "--force", "--json", check=False)
        if proc.returncode:
            rows.append((label, None, None, None, proc.stderr.strip().splitlines()[-1]))
            continue
        report = json.loads(proc.stdout)
        kept = report["parameters"]["after"] / report["parameters"]["before"]
        note = f"{kept:.0%} of the parameters" if kept < 1 else f"{report['sparsity']['achieved']:.0%} zeros in place"
        rows.append((label, t.perplexity(out), report["seconds"], report["peak_rss_bytes"], note))
        if label.startswith("layers") and args.recovery_steps:
            rows += recover(out, t, args.recovery_steps, work)
        if label == "sparsegpt 2:4" and args.quantize:
            rows += quantized(out, t, args.samples, work, args.llmcompressor)
    spread = input_spread(t, args.samples)

    r = t.record
    lines = [f"Model: {t.describe(timing=True)}{outliers.describe(r)}. Calibration: {args.samples} windows of "
             f"{SEQ_LEN} tokens from the training text; perplexity on the held-out text (`llmctl eval --task "
             "perplexity`).", "",
             "| model | val perplexity | vs dense | prune time (s) | peak RSS (MiB) | note |",
             "|---|---:|---:|---:|---:|---|"]
    for label, ppl, seconds, rss, note in rows:
        change = f"{100 * (ppl / dense - 1):+.1f} %" if ppl and label != "dense" else ""
        cells = [label, f"{ppl:.2f}" if ppl else "–", change, f"{seconds:.1f}" if seconds is not None else "",
                 f"{rss / 2**20:.0f}" if rss else "", note or ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Input feature norms of the dense model, max_j ‖X_j‖ / median_j ‖X_j‖ per linear (over the "
              "calibration tokens):", "",
              "| input of | median over layers | max | per layer |", "|---|---:|---:|---|"]
    for kind, values in spread.items():
        lines.append(f"| {kind} | {statistics.median(values):.1f} | {max(values):.1f} | "
                     f"{' '.join(f'{v:.1f}' for v in values)} |")
    out = args.out or Path(__file__).parent / "results" / f"prune-{t.stem}{outliers.suffix(r)}.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
