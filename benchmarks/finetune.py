"""Finetuning: LoRA / DoRA / QLoRA tokens/s vs a PEFT + transformers loop; peak RSS of full / lora / qlora.

Throughput: the model of benchmarks/train.py (Llama-style d=384, 6 layers, vocab 4096) as a
transformers checkpoint, adapters r=16, alpha=32 on every linear layer but the head, batch 8 ×
seq 256, AdamW over the adapter; llmctl's step is `Trainer.train_step` of `llmctl finetune`
(same config resolution), PEFT's is `get_peft_model(LlamaForCausalLM)` + `torch.optim.AdamW`
+ clipping. Steps alternate between contenders. PEFT's QLoRA needs bitsandbytes, which has no
CPU build here: llmctl's QLoRA (NF4 base, bf16 compute) is compared with PEFT's bf16 LoRA on
the dense base, both without gradient checkpointing (the qlora recipe's default is on: the row passes
`gradient_checkpointing=false`); `qlora-ckpt` (only with `--only bf16:qlora-ckpt`) checkpoints on both
sides (transformers' `activation_checkpointing_enable`). `--compile` adds llmctl with `compile=true` (the
trainer's torch.compile of the model) as a third contender. bf16 rows also time PEFT on transformers' eager
attention (16-bit products, like llmctl's CPU kernel under 1,024 keys); ratios are to the faster PEFT. `--rss`: peak RSS of `llmctl finetune --config finetune/{lora,qlora}` (the
recipes' settings: QLoRA checkpoints, LoRA does not) on the `llama` preset (~125M parameters) at seq 512 ×
batch 4, each case (`RSS_CASES`) in its own process.

    python -m benchmarks.finetune [--steps 8] [--warmup 2] [--threads 2] [--only fp32:lora,bf16:qlora] [--compile]
    python -m benchmarks.finetune --rss [--rss-steps 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.train import ARCH, BATCH, SEQ, interleaved

R, ALPHA, LR = 16, 32, 2e-4
DEFAULT_ROWS = ("fp32:lora", "fp32:dora", "bf16:lora", "bf16:dora", "bf16:qlora")
WORDS = 4096


def make_tokenizer(out: Path) -> None:
    """A word-level tokenizer of WORDS words (w0 … w4095, w0 = EOS): one token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(WORDS)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w0", "unk_token": "w1"}))


def make_base(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=ARCH["vocab_size"], hidden_size=ARCH["hidden_size"],
                      intermediate_size=ARCH["intermediate_size"], num_hidden_layers=ARCH["num_layers"],
                      num_attention_heads=ARCH["num_heads"], num_key_value_heads=ARCH["num_kv_heads"],
                      max_position_embeddings=ARCH["max_seq_len"], tie_word_embeddings=True, eos_token_id=0)
    out = root / "base"
    LlamaForCausalLM(cfg).save_pretrained(out)
    make_tokenizer(out)
    return out


def make_records(path: Path, seq: int, n: int = 64) -> Path:
    """`text` records of seq random words: with the EOS, each fills one packed row of seq + 1."""
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"text": " ".join(f"w{rng.randrange(2, WORDS)}" for _ in range(seq))}) + "\n"
                            for _ in range(n)))
    return path


def finetune_args(method: str, precision: str, seq: int, batch: int, steps: int) -> list[str]:
    return [f"method={method}", f"adapter.r={R}", f"adapter.alpha={ALPHA}", "adapter.target_modules=all-linear",
            f"max_steps={steps}", f"batch_size={batch}", f"seq_len={seq}", f"lr={LR}", "warmup_steps=0",
            "eval_every=0", "save_every=0", "val_fraction=0", f"precision={precision}", "peak_tflops=1",
            "tensorboard=false"]


def llmctl_step(base: Path, data: Path, root: Path, method: str, precision: str, steps: int, extra=()):
    from llmctl.config import load_config
    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.finetune_config import FinetuneConfig
    from llmctl.core.train.loop import Trainer

    cfg = load_config(FinetuneConfig, None, [*finetune_args(method, precision, SEQ, BATCH, steps), *extra],
                      kind="finetune")
    cfg.model, cfg.data = str(base), [str(data)]
    out = root / f"llmctl-{method}-{precision}{'-'.join(['', *extra]).replace('=', '')}"
    out.mkdir()
    trainer = Trainer(make_plan(cfg, "cpu"), out, torch.device("cpu"), distributed.Dist(), {})
    return trainer.train_step


def peft_step(base: Path, method: str, precision: str, checkpointing: bool = False, attention: str = "sdpa"):
    from benchmarks.gpu import peft_lora_step

    return peft_lora_step(base, WORDS, BATCH, SEQ, torch.device("cpu"), dora=method == "dora", precision=precision,
                          checkpointing=checkpointing, attention=attention)


def _vs_peft(runs: dict[str, list[float]], name: str) -> str:
    """Table cells: best tokens/s of `name`, its ratio to PEFT's best, whichever its attention
    (and the medians' ratio)."""
    peft = [runs[k] for k in ("PEFT", "PEFT eager") if k in runs]
    best, median = max(runs[name]), statistics.median(runs[name])
    ratio, medians = best / max(map(max, peft)), median / max(map(statistics.median, peft))
    return f" {best:,.0f} | {ratio:.2f}× ({medians:.2f}×) |"


def throughput(args) -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_base(root)
        data = make_records(root / "data.jsonl", SEQ)
        n = args.steps + args.warmup
        for precision, methods in (("fp32", ("lora", "dora")), ("bf16", ("lora", "dora", "qlora", "qlora-ckpt"))):
            for row in (m for m in methods if f"{precision}:{m}" in (args.only or DEFAULT_ROWS)):
                method, checkpointing = row.removesuffix("-ckpt"), row.endswith("-ckpt")
                extra = [f"gradient_checkpointing={str(checkpointing).lower()}"]
                steps = {"llmctl": llmctl_step(base, data, root, method, precision, n, extra),
                         "PEFT": peft_step(base, "lora" if method == "qlora" else method, precision, checkpointing)}
                if precision == "bf16":  # transformers' eager attention: 16-bit products, as llmctl's on CPU
                    steps["PEFT eager"] = peft_step(base, "lora" if method == "qlora" else method, precision,
                                                    checkpointing, attention="eager")
                if args.compile:
                    steps["compiled"] = llmctl_step(base, data, root, method, precision, n, [*extra, "compile=true"])
                    steps["compiled"]()  # compiles (minutes), before anything is timed
                runs = interleaved(steps, args.steps, args.warmup)
                eager = f"{max(runs['PEFT eager']):,.0f}" if "PEFT eager" in runs else "—"
                cells = f"| {precision} | {method} | {'on' if checkpointing else 'off'} | {max(runs['PEFT']):,.0f} | {eager} |"
                cells += _vs_peft(runs, "llmctl") + (_vs_peft(runs, "compiled") if args.compile else "")
                rows.append(cells + f" {Path('/proc/loadavg').read_text().split()[0]} |")
                print(rows[-1], flush=True)
    import peft
    import transformers

    return [
        "## Finetune: adapter tokens/s vs PEFT + transformers — `python -m benchmarks.finetune "
        f"--steps {args.steps} --warmup {args.warmup} --threads {args.threads}" + (" --compile" if args.compile else "")
        + (f" --only {','.join(args.only)}" if args.only else "") + "`",
        "",
        f"Model: the train benchmark's Llama-style d=384, 6 layers, vocab 4096 (tied), as a transformers checkpoint; "
        f"r={R}, alpha={ALPHA}, every linear layer but the head; batch {BATCH} × seq {SEQ}; AdamW lr {LR} over the "
        f"adapter, clip 1.0. {args.threads} thread(s), {platform.machine()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}. Best of {args.steps} steps after "
        f"{args.warmup} warm-up steps, contenders alternating step by step; ratios best / best (medians' ratio in "
        "brackets); the load average (1 min) as the row ended. QLoRA: llmctl's NF4 base vs PEFT's bf16 LoRA on the "
        "dense base (PEFT's QLoRA needs bitsandbytes, not available on this CPU); gradient checkpointing as the "
        "row says, on both sides. bf16 rows also time PEFT on transformers' eager attention (16-bit products, as "
        "llmctl's CPU kernel under 1,024 keys); ratios are to the faster PEFT.",
        "",
        "| precision | method | gradient checkpointing (both) | PEFT tokens/s | PEFT eager attention | llmctl tokens/s "
        "| llmctl / PEFT |" + (" llmctl compile=true tokens/s | compiled / PEFT |" if args.compile else "") + " load |",
        "|---|---|---|---|---|---|---|" + ("---|---|" if args.compile else "") + "---|",
        *rows, ""]


# (label, recipe under configs/finetune, overrides): each row as the recipe trains it, plus LoRA with
# checkpointing (the fair comparison with QLoRA, which checkpoints) and QLoRA without it.
RSS_CASES = (
    ("full", "lora", ["method=full"]),
    ("lora", "lora", []),
    ("lora", "lora", ["gradient_checkpointing=true"]),
    ("lora", "lora", ["precision=bf16"]),
    ("qlora", "qlora", []),
    ("qlora", "qlora", ["gradient_checkpointing=false"]),
)
RSS_SHAPE = ["max_steps={steps}", "batch_size=4", "seq_len=512", "warmup_steps=0", "eval_every=0", "save_every=0",
             "val_fraction=0", "peak_tflops=1", "tensorboard=false"]


def peak_rss(args) -> list[str]:
    """Peak RSS of `llmctl finetune --config finetune/RECIPE` per case on the llama preset (seq 512, batch 4)."""
    from llmctl.config import load_config
    from llmctl.core.model.build import build_model
    from llmctl.core.model.io import save_model
    from llmctl.core.model.presets import load_preset
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.finetune_config import FinetuneConfig

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = root / "tok"
        tok.mkdir()
        make_tokenizer(tok)
        torch.manual_seed(0)
        base = save_model(build_model(load_preset("llama", [])), root / "llama", tokenizer_dir=tok)
        data = make_records(root / "data.jsonl", 512, n=16)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for i, (label, recipe, overrides) in enumerate(RSS_CASES):
            shape = [a.format(steps=args.rss_steps) for a in RSS_SHAPE]
            cfg = load_config(FinetuneConfig, recipe, [*shape, *overrides], kind="finetune")
            cfg.model, cfg.data = str(base), [str(data)]
            plan = make_plan(cfg, "cpu")  # the settings the run resolves to
            precision = {"float32": "fp32", "bfloat16": "bf16"}[plan.precision]
            checkpointing = plan.model_config.gradient_checkpointing
            cmd = [sys.executable, "-m", "llmctl", "--quiet", "finetune", str(base), "--config", recipe, "--data",
                   str(data), *shape, *overrides, "-o", str(root / f"out-{i}")]
            proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(proc.pid, 0)
            if status != 0:
                raise SystemExit(f"{label} {overrides}: {proc.stderr.read().decode()}")
            load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
            rows.append((label, recipe, " ".join(overrides) or "—", precision, checkpointing, usage.ru_maxrss / 1024,
                         load))
            print(f"{label} (finetune/{recipe} {' '.join(overrides)}): {precision}, checkpointing {checkpointing}, "
                  f"peak RSS {rows[-1][5]:,.0f} MiB (load {load})", flush=True)
    lora = next(r[5] for r in rows if r[:3] == ("lora", "lora", "—"))
    lora_ckpt = next(r[5] for r in rows if r[0] == "lora" and r[3] == "fp32" and r[4])
    return [
        f"## Finetune: peak RSS on the `llama` preset — `python -m benchmarks.finetune --rss --rss-steps {args.rss_steps}`",
        "",
        f"`llmctl finetune --config finetune/RECIPE` of a randomly initialised `llama` preset checkpoint (~125M "
        f"parameters, float32 on disk) with the recipe's settings (r=16, alpha=32, dropout 0.05, every linear layer "
        f"but the head) at seq 512 × batch 4, {args.rss_steps} step(s), each run in its own process (peak RSS from "
        f"wait4), {args.threads} thread(s). The goal's reference is the lora recipe as it is (fp32 on CPU, no "
        "checkpointing).",
        "",
        "| method | recipe | overrides | precision | gradient checkpointing | peak RSS | vs lora recipe "
        "| vs lora fp32 + checkpointing | load average |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {m} | {r} | {o} | {p} | {'on' if c else 'off'} | {rss:,.0f} MiB | {rss / lora:.2f}× | "
          f"{rss / lora_ckpt:.2f}× | {load} |" for m, r, o, p, c, rss, load in rows], ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", type=lambda v: v.split(","), default=None,
                        help="throughput rows to time, e.g. fp32:lora,bf16:qlora (default: DEFAULT_ROWS; also bf16:qlora-ckpt)")
    parser.add_argument("--compile", action="store_true", help="also time llmctl with compile=true")
    parser.add_argument("--rss", action="store_true", help="measure peak RSS instead of throughput")
    parser.add_argument("--rss-steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = peak_rss(args) if args.rss else throughput(args)
    out = args.out or Path(__file__).parent / "results" / ("finetune_rss.md" if args.rss else "finetune.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
