"""DPO step time: `llmctl finetune --method dpo` vs TRL's DPOTrainer on the same model and batches.

Model: a tiny transformers Llama (d=128, 4 layers, vocab 4096, tied: the finetune benchmark's
word-level tokenizer); data:
prompt + chosen / rejected of random words (64 + 64 tokens, EOS after each answer); batch 8
pairs (16 sequences) per optimizer step, beta 0.1, AdamW, clip 1.0, float32. `lora`: r=16,
alpha=32 on every linear layer but the head, the reference is the base with the adapter off
(both); `full`: every weight trains, the reference is a frozen copy (both). llmctl's step is
`Trainer.train_step` of `llmctl finetune` (same config resolution); TRL's is the time between
its `on_step_begin` and `on_step_end` callbacks inside `DPOTrainer.train()`, with gradient
checkpointing off (TRL's default is on) so both do the same work. Each contender
runs its steps in turn, twice (llmctl, TRL, llmctl, TRL); medians after warm-up steps.

    python -m benchmarks.preference [--steps 8] [--warmup 2] [--threads 2] [--methods lora,full]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.finetune import WORDS, make_tokenizer

BATCH, PROMPT, ANSWER, BETA, LR = 8, 64, 64, 0.1, 5e-5
R, ALPHA = 16, 32


def make_base(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=WORDS, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=0, pad_token_id=0)
    out = root / "base"
    LlamaForCausalLM(cfg).save_pretrained(out)
    make_tokenizer(out)
    return out


def make_pairs(path: Path, n: int = 256) -> Path:
    rng = random.Random(0)

    def words(k):
        return " ".join(f"w{rng.randrange(2, WORDS)}" for _ in range(k))
    path.write_text("".join(json.dumps({"prompt": words(PROMPT), "chosen": " " + words(ANSWER),
                                        "rejected": " " + words(ANSWER)}) + "\n" for _ in range(n)))
    return path


def llmctl_steps(base: Path, data: Path, root: Path, method: str, total: int):
    from llmctl.config import load_config
    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.finetune_config import FinetuneConfig
    from llmctl.core.train.loop import Trainer

    overrides = ["method=dpo", f"adapter.method={method}", f"adapter.r={R}", f"adapter.alpha={ALPHA}",
                 "adapter.target_modules=all-linear", f"objective_args.beta={BETA}", f"max_steps={total}",
                 f"batch_size={BATCH}", f"seq_len={PROMPT + ANSWER + 8}", f"lr={LR}", "warmup_steps=0",
                 "schedule=constant", "weight_decay=0", "eval_every=0", "save_every=0", "val_fraction=0",
                 "precision=float32", "peak_tflops=1", "tensorboard=false"]
    cfg = load_config(FinetuneConfig, None, overrides, kind="finetune")
    cfg.model, cfg.data, cfg.objective = str(base), [str(data)], cfg.training_objective
    out = root / f"llmctl-{method}-{time.monotonic_ns()}"
    out.mkdir()
    trainer = Trainer(make_plan(cfg, "cpu"), out, torch.device("cpu"), distributed.Dist(), {})

    def run(n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - start)
        return times
    return run


def trl_steps(base: Path, data: Path, root: Path, method: str):
    import datasets
    import peft
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = PreTrainedTokenizerFast(tokenizer_file=str(base / "tokenizer.json"), eos_token="w0", pad_token="w0",
                                  unk_token="w1")
    records = datasets.Dataset.from_list([json.loads(x) for x in data.read_text().splitlines()])

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    def run(n: int) -> list[float]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = DPOConfig(output_dir=str(root / f"trl-{method}-{time.monotonic_ns()}"), per_device_train_batch_size=BATCH,
                           max_steps=n, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                           weight_decay=0.0, max_grad_norm=1.0, beta=BETA, logging_steps=n, save_strategy="no",
                           report_to="none", use_cpu=True, dataloader_num_workers=0, seed=0,
                           gradient_checkpointing=False)  # TRL's default is on; llmctl's run keeps activations too
        lora = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0,
                               task_type="CAUSAL_LM") if method == "lora" else None
        timer = Timer()
        trainer = DPOTrainer(model=model, args=config, train_dataset=records, processing_class=tok, peft_config=lora,
                             callbacks=[timer])
        trainer.train()
        return timer.times
    return run


def measure(args) -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_base(root)
        data = make_pairs(root / "pairs.jsonl")
        n = args.steps + args.warmup
        for method in args.methods:
            ours, theirs = llmctl_steps(base, data, root, method, 2 * n), trl_steps(base, data, root, method)
            times = {"llmctl": [], "TRL": []}
            for _ in range(2):  # in turn, twice: each contender sees both halves of the machine's load
                times["llmctl"] += ours(n)[args.warmup:]
                times["TRL"] += theirs(n)[args.warmup:]
            median = {k: statistics.median(v) for k, v in times.items()}
            ratio = median["TRL"] / median["llmctl"]
            rows.append(f"| {method} | {median['llmctl'] * 1000:,.0f} | {median['TRL'] * 1000:,.0f} | {ratio:.2f}× |")
            print(rows[-1], flush=True)
    import transformers
    import trl

    return [
        "## Preference: DPO step time vs TRL's DPOTrainer — `python -m benchmarks.preference "
        f"--steps {args.steps} --warmup {args.warmup} --threads {args.threads} --methods {','.join(args.methods)}`",
        "",
        f"Model: a tiny Llama (d=128, 4 layers, 4 heads / 2 KV heads, vocab 4096, tied) as a transformers checkpoint; "
        f"{BATCH} pairs per step (prompt {PROMPT} + answer {ANSWER} tokens of random words), beta {BETA}, AdamW "
        f"lr {LR}, clip 1.0, float32; lora: r={R}, alpha={ALPHA} on every linear layer but the head, reference = "
        f"adapter off; full: reference = frozen copy. {args.threads} thread(s), {platform.machine()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}. Median of "
        f"2 × {args.steps} steps after {args.warmup} warm-up steps per run, runs alternating.",
        "",
        "| method | llmctl ms/step | TRL ms/step | speed-up (TRL / llmctl) |",
        "|---|---|---|---|",
        *rows, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--methods", type=lambda v: v.split(","), default=["lora", "full"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = measure(args)
    out = args.out or Path(__file__).parent / "results" / "preference.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
