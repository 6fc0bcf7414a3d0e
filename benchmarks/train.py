"""Training throughput: `llmctl train` vs a plain transformers LlamaForCausalLM + AdamW loop.

Same architecture (d=384, 6 layers, 6 heads, 2 KV heads, SwiGLU 1024, vocab 4096, tied
embeddings), same data shape (batch 8 × seq 256), same optimizer settings, same threads, in one
process, at float32 and at bf16 autocast. Reports tokens/s (median step, contenders interleaved) and the
achieved FLOP/s (6·N + attention per token) as a share of the measured matmul peak at that
precision. Writes benchmarks/results/train.md.

    python benchmarks/train.py [--steps 12] [--threads 2]
"""

from __future__ import annotations

import sys

sys.path = [p for p in sys.path if p not in ("", __file__.rpartition("/")[0])]  # benchmarks/tokenize.py shadows stdlib

import argparse
import json
import platform
import shlex
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ARCH = dict(vocab_size=4096, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2, intermediate_size=1024,
            max_seq_len=256, tie_embeddings=True)
BATCH, SEQ, LR = 8, 256, 3e-4


def make_shards(root: Path, tokens: int = 400_000) -> Path:
    """Random-token shards in the `llmctl tokenize encode` format."""
    rng = np.random.default_rng(0)
    out = root / "shards"
    out.mkdir()
    for split, n in (("train", tokens), ("val", 20_000)):
        rng.integers(0, ARCH["vocab_size"], n, dtype=np.uint16).tofile(out / f"{split}-00000.bin")
    splits = {s: {"tokens": n, "documents": 1, "shards": [{"file": f"{s}-00000.bin", "tokens": n, "documents": 1}]}
              for s, n in (("train", tokens), ("val", 20_000))}
    manifest = {"format": "llmctl-tokens", "version": 1, "dtype": "uint16", "tokenizer_hash": "random",
                "vocab_size": ARCH["vocab_size"], "eos_id": None, "bos_id": None, "splits": splits}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def llmctl_cmd(shards: Path, out: Path, steps: int, precision: str, compile: bool = False) -> list[str]:
    model_args = "{" + ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in ARCH.items()) + "}"
    return ["--quiet", "train", f"data={shards}", "model=nano", f"model_args={model_args}", f"max_steps={steps}",
            f"batch_size={BATCH}", f"seq_len={SEQ}", f"lr={LR}", "warmup_steps=2", "eval_every=0", "save_every=0",
            "eval_batches=1", f"precision={precision}", f"compile={str(compile).lower()}", "peak_tflops=1", "tensorboard=false", "-o", str(out)]


def llmctl_step(shards: Path, root: Path, steps: int, precision: str, compile: bool = False):
    """One optimizer step of `llmctl train` with exactly the CLI's config resolution and Trainer."""
    from llmctl.config import load_config
    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.config import TrainConfig
    from llmctl.core.train.loop import Trainer

    out = root / f"llmctl-{precision}-{compile}"
    args = llmctl_cmd(shards, out, steps, precision, compile)[2:-2]
    cfg = load_config(TrainConfig, None, args, kind="train")
    out.mkdir()
    trainer = Trainer(make_plan(cfg, "cpu"), out, torch.device("cpu"), distributed.Dist(), {})
    return trainer.train_step


def hf_step(shards: Path, precision: str):
    """One step of the plain loop: LlamaForCausalLM, torch.optim.AdamW, clipping, random windows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=ARCH["vocab_size"], hidden_size=ARCH["hidden_size"],
                      intermediate_size=ARCH["intermediate_size"], num_hidden_layers=ARCH["num_layers"],
                      num_attention_heads=ARCH["num_heads"], num_key_value_heads=ARCH["num_kv_heads"],
                      max_position_embeddings=ARCH["max_seq_len"], tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    data = np.fromfile(shards / "train-00000.bin", dtype=np.uint16)
    rng = np.random.default_rng(0)

    def step() -> float:
        starts = rng.integers(0, len(data) - SEQ - 1, BATCH)
        x = torch.from_numpy(np.stack([data[s:s + SEQ] for s in starts]).astype(np.int64))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def interleaved(steps: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Tokens/s of every step, alternating the contenders step by step (fair under noisy load)."""
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= warmup:
                rates[name].append(BATCH * SEQ / (time.perf_counter() - start))
    return rates


def flops_per_token() -> float:
    from llmctl.core.model import ModelConfig, Transformer
    from llmctl.core.train.metrics import flops_per_token as fpt

    with torch.device("meta"):
        model = Transformer(ModelConfig(**ARCH))
    return fpt(model, SEQ)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="also time llmctl train compile=true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from llmctl.core.train.metrics import measure_matmul_peak

    fpt = flops_per_token()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_shards(root)
        for precision in ("fp32", "bf16"):
            dtype = torch.float32 if precision == "fp32" else torch.bfloat16
            peak = measure_matmul_peak(dtype, torch.device("cpu"), size=2048, seconds=2.0)
            steps = {"llmctl train": llmctl_step(shards, root, args.steps + args.warmup, precision)}
            if args.compile:
                steps["llmctl train compile=true"] = llmctl_step(shards, root, args.steps + args.warmup, precision, True)
            steps["HF loop"] = hf_step(shards, precision)
            rates = {name: statistics.median(r) for name, r in interleaved(steps, args.steps, args.warmup).items()}
            for name, rate in rates.items():
                rows.append((precision, name, rate, rate / rates["HF loop"], rate * fpt / peak, peak))
                print(f"{precision} {name}: {rate:,.0f} tok/s, x{rate / rates['HF loop']:.2f}", flush=True)

    import transformers

    lines = [
        "# Training throughput: `llmctl train` vs transformers LlamaForCausalLM + torch.optim.AdamW",
        "",
        f"Model: Llama-style d=384, 6 layers, 6 heads / 2 KV heads, SwiGLU 1024, vocab 4096, tied "
        f"embeddings ({fpt / 6 / 1e6:.1f}M matmul params); batch {BATCH} × seq {SEQ}; AdamW lr {LR}, clip 1.0. "
        f"{args.threads} thread(s), {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}. Steps of the contenders alternate one by one (fair under a noisy "
        f"load); median of {args.steps} steps after {args.warmup} warm-up steps each. llmctl steps are "
        "`Trainer.train_step` built by the same config resolution as the command below.",
        "",
        "| precision | loop | tokens/s | vs HF loop | achieved FLOP/s | % of matmul peak (peak GFLOP/s) |",
        "|---|---|---|---|---|---|",
    ]
    for precision, name, rate, ratio, achieved, peak in rows:
        lines.append(f"| {precision} | {name} | {rate:,.0f} | {ratio:.2f}× | {rate * fpt / 1e9:,.1f} G | "
                     f"{100 * achieved:.1f}% ({peak / 1e9:,.0f}) |")
    lines += ["", "Command:", "", "```",
              f"python benchmarks/train.py --steps {args.steps} --warmup {args.warmup} --threads {args.threads}"
              + (" --compile" if args.compile else ""), "```",
              "", "The equivalent `llmctl train` run:", "", "```",
              shlex.join(["llmctl", *llmctl_cmd(Path("SHARDS"), Path("OUT"), args.steps, "PRECISION")]), "```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
