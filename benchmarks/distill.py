"""Distillation throughput: `llmctl distill` vs a plain transformers teacher + student loop.

Same models (teacher: Llama d=384, 6 layers; student: d=256, 4 layers; SwiGLU, 2 KV heads,
tied embeddings, vocab 4096 by default), same data (batch 8 × seq 256 of Python's docs), same
loss (0.5 · T²·KL(teacher ‖ student) at T = 2 + 0.5 · cross-entropy), same AdamW, same
threads, in one process. The plain loop is what one writes with transformers: both models'
full logits, `log_softmax`, `kl_div`. Tokens/s are medians of steps that alternate between the
contenders. Writes benchmarks/results/distill.md.

    python -m benchmarks.distill [--steps 10] [--warmup 2] [--vocab 4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.train import BATCH, LR, SEQ, interleaved

TEACHER = dict(hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2, intermediate_size=1024)
STUDENT = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768)
T = 2.0


def prepare(root: Path, vocab: int) -> tuple[Path, Path, int]:
    """(token shards of Python's docs, a random teacher checkpoint with their tokenizer, its vocabulary)."""
    from pydoc_data.topics import topics

    from llmctl.core.data import Corpus, encode_corpus
    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model
    from llmctl.core.model.io import save_model
    from llmctl.core.tokenizer import TrainSpec, train_tokenizer

    text = root / "docs.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    tok = train_tokenizer(TrainSpec(algo="bytelevel", vocab_size=vocab, special_tokens=["<|endoftext|>"]),
                          iter([text.read_text(encoding="utf-8").split("\n\n")]))
    tok.save(root / "tok")
    (root / "shards").mkdir()
    encode_corpus(Corpus([str(text)]), tok, root / "shards", val_fraction=0.05)
    torch.manual_seed(0)
    teacher = build_model(ModelConfig(vocab_size=tok.vocab_size, max_seq_len=SEQ, tie_embeddings=True, **TEACHER))
    save_model(teacher, root / "teacher", tokenizer_dir=root / "tok")
    return root / "shards", root / "teacher", tok.vocab_size


def student_args() -> str:
    return "model_args={" + ", ".join(f"{k}: {v}" for k, v in {**STUDENT, "max_seq_len": SEQ}.items()) + "}"


def llmctl_cmd(shards: Path, teacher: Path, out: Path, steps: int) -> list[str]:
    return ["--quiet", "distill", "--teacher", str(teacher), "--student", "nano", "--data", str(shards), student_args(),
            f"max_steps={steps}", f"batch_size={BATCH}", f"seq_len={SEQ}", f"lr={LR}", "warmup_steps=2",
            "eval_every=0", "save_every=0", "eval_batches=1", "precision=float32", "peak_tflops=1",
            "tensorboard=false", f"objective_args.temperature={T}", "-o", str(out)]


def llmctl_step(shards: Path, teacher: Path, root: Path, steps: int):
    """One optimizer step of `llmctl distill`: the train config it makes, the Trainer."""
    from llmctl.config import load_config
    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.config import TrainConfig
    from llmctl.core.train.loop import Trainer

    out = root / "llmctl"
    cmd = llmctl_cmd(shards, teacher, out, steps)
    overrides = ["objective=distill", f"objective_args.teacher={teacher}", f"data={shards}", *cmd[8:-2]]
    cfg = load_config(TrainConfig, None, overrides, kind="train")
    out.mkdir()
    trainer = Trainer(make_plan(cfg, "cpu"), out, torch.device("cpu"), distributed.Dist(), {})
    return trainer.train_step


def hf_step(shards: Path, vocab: int):
    """The plain loop: two LlamaForCausalLM, full logits, log_softmax + kl_div, AdamW, clipping."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(a: dict) -> LlamaForCausalLM:
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=a["hidden_size"],
                                            intermediate_size=a["intermediate_size"],
                                            num_hidden_layers=a["num_layers"], num_attention_heads=a["num_heads"],
                                            num_key_value_heads=a["num_kv_heads"], max_position_embeddings=SEQ,
                                            tie_word_embeddings=True))

    torch.manual_seed(0)
    teacher, student = llama(TEACHER).eval().requires_grad_(False), llama(STUDENT).train()
    opt = torch.optim.AdamW(student.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    data = np.concatenate([np.fromfile(f, dtype=np.uint16) for f in sorted(shards.glob("train-*.bin"))])
    rng = np.random.default_rng(0)

    def step() -> float:
        starts = rng.integers(0, len(data) - SEQ - 1, BATCH)
        rows = torch.from_numpy(np.stack([data[s:s + SEQ + 1] for s in starts]).astype(np.int64))
        x, y = rows[:, :-1], rows[:, 1:]
        with torch.no_grad():
            t_logits = teacher(input_ids=x).logits
        s_logits = student(input_ids=x).logits
        kl = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True,
                      reduction="none").sum(-1).mean()
        ce = F.cross_entropy(s_logits.flatten(0, 1), y.flatten())
        loss = 0.5 * T * T * kl + 0.5 * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return ce.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distill.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards, teacher, vocab = prepare(root, args.vocab)
        steps = {"llmctl distill": llmctl_step(shards, teacher, root, args.steps + args.warmup),
                 "transformers loop": hf_step(shards, vocab)}
        rates = {name: statistics.median(r) for name, r in interleaved(steps, args.steps, args.warmup).items()}
    base = rates["transformers loop"]
    for name, rate in rates.items():
        print(f"{name}: {rate:,.0f} tok/s, x{rate / base:.2f}", flush=True)
    lines = [
        "# Distillation throughput: `llmctl distill` vs a transformers teacher + student loop", "",
        f"Teacher Llama d=384 × 6 layers, student d=256 × 4 layers (SwiGLU, 2 KV heads, tied embeddings), vocab "
        f"{vocab} (a byte-level BPE trained for {args.vocab}); batch {BATCH} × seq {SEQ}; loss 0.5·T²·KL + 0.5·CE at T={T}; AdamW lr {LR}, clip 1.0; "
        f"float32; {args.threads} thread(s), {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}. Median of {args.steps} alternating steps after {args.warmup} "
        "warm-up steps each.", "",
        "| loop | tokens/s | vs transformers |", "|---|---|---|",
        *[f"| {name} | {rate:,.0f} | {rate / base:.2f}× |" for name, rate in rates.items()], "",
        "Command:", "", "```",
        f"python -m benchmarks.distill --steps {args.steps} --warmup {args.warmup} --vocab {args.vocab} "
        f"--threads {args.threads}", "```", "", "The equivalent `llmctl distill` run:", "", "```",
        shlex.join(["llmctl", *llmctl_cmd(Path("SHARDS"), Path("TEACHER"), Path("OUT"), args.steps)]), "```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
