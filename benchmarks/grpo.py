"""GRPO: the arithmetic demonstration (reward curve, eval before/after) and step time vs TRL.

`demo`: a tiny Llama (d=128, 4 layers, byte-level BPE) learns the built-in `arithmetic` task
(two-digit + and -, `llmctl eval --task arithmetic`'s format) by a short full SFT on
generated examples (seed 1), then GRPO (full finetuning, the `number` verifier, 8 completions
per prompt, prompts of seed 2) raises the mean verifier reward; `llmctl eval --task arithmetic`
(200 problems of seed 0) before and after, the reward curve by 25-step windows, and
`llmctl plot --metric reward` of the run.

`speed`: one GRPO step (generation of the groups, rewards, loss, backward, AdamW) of
`llmctl finetune --method grpo` (its Trainer.train_step) against TRL's GRPOTrainer.train on the
same tiny model, prompts, group size, completion length and reward function, steps timed
alternately.

    python -m benchmarks.grpo demo [--sft-steps 300] [--grpo-steps 300] [--out DIR] [--sft DIR] [key=value …]
    python -m benchmarks.grpo speed [--steps 10] [--warmup 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ARCH = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
CONTEXT = 64
G, PROMPTS, MAX_COMPLETION = 8, 8, 8  # group size, prompts per step, completion tokens


def make_base(out: Path) -> Path:
    """A randomly initialised tiny Llama with a byte-level BPE tokenizer trained on arithmetic text."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llmctl.core.evaluate.builtin import generate

    out.mkdir(parents=True, exist_ok=True)
    text = [f"{d['a']} {d['op']} {d['b']} = {d['answer']}\n" for d in generate("arithmetic", 2000, 99)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
        "pad_token": "<|pad|>", "model_max_length": CONTEXT}))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), max_position_embeddings=CONTEXT,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=True,
                                      **ARCH)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    return out


def write_data(root: Path, sft_n: int = 4000, rl_n: int = 2000) -> tuple[Path, Path]:
    from llmctl.core.evaluate.builtin import generate

    prompt = "{a} {op} {b} ="
    sft, rl = root / "sft.jsonl", root / "rl.jsonl"
    sft.write_text("".join(json.dumps({"prompt": prompt.format(**d), "completion": f" {d['answer']}"}) + "\n"
                           for d in generate("arithmetic", sft_n, 1)))
    rl.write_text("".join(json.dumps({"prompt": prompt.format(**d), "answer": d["answer"]}) + "\n"
                          for d in generate("arithmetic", rl_n, 2)))
    return sft, rl


def llmctl(*args, json_out: bool = False) -> dict | None:
    cmd = [sys.executable, "-m", "llmctl", *(["--json"] if json_out else ["--quiet"]), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout) if json_out else None


def accuracy(checkpoint: Path) -> float:
    result = llmctl("eval", checkpoint, "--task", "arithmetic", "--no-record", json_out=True)
    return _find(result, "exact_match")


def _find(data, key):
    """The first value under `key` anywhere in a JSON result."""
    if isinstance(data, dict):
        if key in data and isinstance(data[key], (int, float)):
            return data[key]
        data = list(data.values())
    if isinstance(data, list):
        for item in data:
            found = _find(item, key)
            if found is not None:
                return found
    return None


def grpo_args(steps: int) -> list[str]:
    return ["--method", "grpo", f"max_steps={steps}", f"batch_size={PROMPTS}", f"seq_len={CONTEXT}", "lr=1e-4",
            "warmup_steps=10", "schedule=constant", "weight_decay=0", "eval_every=0", "save_every=100",
            "precision=float32", "tensorboard=false", "peak_tflops=1", "objective_args.verifiers={number: {}}",
            f"objective_args.num_generations={G}", f"objective_args.max_completion_length={MAX_COMPLETION}",
            "objective_args.stop=['\\n']"]


def demo(args) -> None:
    root = Path(args.out or tempfile.mkdtemp(prefix="grpo-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    sft_data, rl_data = write_data(root, rl_n=args.prompts)
    if args.sft:  # an SFT model made before: GRPO only
        sft = Path(args.sft)
    else:
        sft = root / "sft"
        llmctl("finetune", make_base(root / "base"), "--method", "full", "--data", sft_data,
               f"max_steps={args.sft_steps}", "batch_size=8", f"seq_len={CONTEXT}", "lr=2e-3", "warmup_steps=20",
               "eval_every=0", "save_every=0", "val_fraction=0", "precision=float32", "tensorboard=false",
               "peak_tflops=1", "-o", sft, "--force")
    before = accuracy(sft)
    print(f"SFT model {sft}: arithmetic exact_match {before:.3f}", flush=True)
    run = root / "grpo"
    start = time.perf_counter()
    llmctl("finetune", sft, *grpo_args(args.grpo_steps), *args.overrides, "--data", rl_data, "-o", run, "--force")
    minutes = (time.perf_counter() - start) / 60
    after = accuracy(run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in records if "reward" in r]
    print(f"after GRPO ({args.grpo_steps} steps, {minutes:.1f} min): arithmetic exact_match {after:.3f}")
    window = 25
    print("| steps | mean reward | completion length | KL |\n| --- | --- | --- | --- |")
    for i in range(0, len(rewards), window):
        chunk = records[i : i + window]
        print(f"| {i + 1}-{i + len(chunk)} | {statistics.mean(r['reward'] for r in chunk):.3f} | "
              f"{statistics.mean(r['completions/mean_length'] for r in chunk):.2f} | "
              f"{statistics.mean(r.get('kl', 0.0) for r in chunk):.4f} |")
    llmctl("plot", run, "--metric", "reward", "-o", root / "grpo-reward.png", "--force")
    print(f"curve: {root / 'grpo-reward.png'}")


# -- speed -----------------------------------------------------------------------------------------

def number_reward(prompts, completions, answer, **kwargs):
    """TRL's side of the `number` verifier."""
    from llmctl.core.rl.verifiers import parse_number

    return [float(parse_number(c) is not None and abs(parse_number(c) - float(a)) < 1e-6)
            for c, a in zip(completions, answer)]


def llmctl_step(base: Path, data: Path, root: Path):
    from llmctl.config import load_config
    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.finetune_config import FinetuneConfig
    from llmctl.core.train.loop import Trainer

    overrides = [a for a in grpo_args(10_000) if "=" in a] + ["method=grpo", "objective=grpo", "warmup_steps=0",
                                                             "objective_args.stop=[]"]
    cfg = load_config(FinetuneConfig, None, overrides, kind="finetune")
    cfg.model, cfg.data = str(base), [str(data)]
    out = root / "llmctl"
    out.mkdir()
    trainer = Trainer(make_plan(cfg, "cpu"), out, torch.device("cpu"), distributed.Dist(), {})
    return trainer.train_step


def trl_step(base: Path, data: Path, root: Path):
    """One GRPOTrainer optimizer step per call (its train loop, driven one step at a time)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows)
    config = GRPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=PROMPTS * G, num_generations=G,
                        max_completion_length=MAX_COMPLETION, learning_rate=1e-4, lr_scheduler_type="constant",
                        weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1_000_000,
                        save_strategy="no", report_to=[], use_cpu=True, bf16=False, max_steps=1_000_000,
                        dataloader_num_workers=0, seed=0, disable_tqdm=True, gradient_checkpointing=False)
    tok = AutoTokenizer.from_pretrained(base)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                          reward_funcs=number_reward, args=config, train_dataset=dataset, processing_class=tok)
    trainer.create_optimizer_and_scheduler(num_training_steps=1_000_000)
    model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batches = iter(trainer.get_train_dataloader())

    def step():
        inputs = next(batches)
        loss = trainer.training_step(model, inputs, None)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def speed(args) -> None:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_base(root / "base")
        _, data = write_data(root, sft_n=10, rl_n=512)
        steps = {"llmctl": llmctl_step(base, data, root), "trl": trl_step(base, data, root)}
        times = {name: [] for name in steps}
        for i in range(args.warmup + args.steps):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"GRPO step, {PROMPTS} prompts x {G} completions of <= {MAX_COMPLETION} tokens, d={ARCH['hidden_size']} "
          f"{ARCH['num_hidden_layers']} layers, {args.threads} threads, median of {args.steps}:")
    for name, t in med.items():
        print(f"  {name}: {t * 1000:.0f} ms/step")
    print(f"  llmctl speed-up: {med['trl'] / med['llmctl']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--sft-steps", type=int, default=300)
    d.add_argument("--grpo-steps", type=int, default=300)
    d.add_argument("--out")
    d.add_argument("--prompts", type=int, default=64, help="GRPO prompts (a small pool: each is seen many times)")
    d.add_argument("--sft", help="start GRPO from this SFT model (skip the base and SFT)")
    d.add_argument("overrides", nargs="*", help="extra key=value for the GRPO run")
    s = sub.add_parser("speed")
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    demo(args) if args.mode == "demo" else speed(args)


if __name__ == "__main__":
    main()
