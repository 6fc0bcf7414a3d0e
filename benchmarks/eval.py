"""Perplexity throughput: `llmctl eval --task perplexity` core vs the transformers strided loop.

Builds (once, in --dir) a byte-level BPE tokenizer trained on the text and a randomly
initialised Llama-architecture checkpoint, then scores the same text with
  - transformers: the loop of the transformers perplexity guide (`LlamaForCausalLM`,
    one window per forward, `labels` with the overlap masked to -100, `torch.no_grad`);
  - llmctl: `llmctl.core.evaluate.perplexity` on the same checkpoint loaded with
    `load_model` (batched windows, logits only for the scored positions), timed end to end
    including reading and tokenizing the file.
Both must agree on the perplexity (1e-4 relative); tokens/s = scored tokens / wall time.

    python -P benchmarks/eval.py --out benchmarks/results/eval.md   (-P: benchmarks/tokenize.py would shadow the stdlib)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def build(directory: Path, text_file: Path, vocab: int, hidden: int, layers: int, context: int) -> None:
    """A tokenizer trained on the text and a random Llama checkpoint, saved in `directory`."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if (directory / "model.safetensors").is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(text_file)], trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden,
                                      intermediate_size=hidden * 8 // 3 // 64 * 64, num_hidden_layers=layers,
                                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                                      max_position_embeddings=context, tie_word_embeddings=False,
                                      bos_token_id=0, eos_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def transformers_loop(directory: Path, text: str, max_length: int, stride: int) -> tuple[float, int, float]:
    """The transformers perplexity guide, verbatim apart from the exact token count."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    start = time.perf_counter()
    encodings = tokenizer(text, return_tensors="pt")
    seq_len = encodings.input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings.input_ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    elapsed = time.perf_counter() - start
    return math.exp(nll_sum / n_tokens), n_tokens, elapsed


def llmctl_perplexity(directory: Path, text_file: Path, max_length: int, stride: int, batch_size: int
                      ) -> tuple[float, int, float]:
    from llmctl.core.evaluate.runner import load_scorer
    from llmctl.runtime import options

    options.quiet = True
    import torch

    from llmctl.core.evaluate.perplexity import perplexity

    lm = load_scorer(directory, device=torch.device("cpu"), dtype=torch.float32, batch_size=batch_size)
    start = time.perf_counter()
    result = perplexity(lm, [text_file], max_length=max_length, stride=stride)
    elapsed = time.perf_counter() - start
    return result["perplexity"], result["tokens"], elapsed


def choice_requests(text: str, questions: int, seed: int = 0) -> list[tuple[str, str]]:
    """HellaSwag-shaped (context, continuation) pairs: 600-character contexts, 4 endings each."""
    import random

    rng = random.Random(seed)
    pairs = []
    for _ in range(questions):
        start = rng.randrange(0, len(text) - 700)
        for _ in range(4):
            end = rng.randrange(0, len(text) - 100)
            pairs.append((text[start : start + 600], " " + text[end : end + rng.randrange(20, 80)].strip()))
    return pairs


def transformers_choice(directory: Path, pairs: list[tuple[list[int], list[int]]], batch_size: int
                        ) -> tuple[list[float], float]:
    """lm-evaluation-harness's HF scoring: whole rows sorted by length, right-padded batches,
    log_softmax over the logits, continuation log-probabilities summed."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    start = time.perf_counter()
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    sums = [0.0] * len(pairs)
    for b in range(0, len(order), batch_size):
        rows = [(pairs[i][0] + pairs[i][1])[:-1] for i in order[b : b + batch_size]]
        ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)
        for r, i in enumerate(order[b : b + batch_size]):
            context, continuation = pairs[i]
            span = logprobs[r, len(context) - 1 : len(context) - 1 + len(continuation)]
            sums[i] = float(span.gather(-1, torch.tensor(continuation)[:, None]).sum())
    return sums, time.perf_counter() - start


def llmctl_choice(directory: Path, pairs: list[tuple[list[int], list[int]]], batch_size: int
                  ) -> tuple[list[float], float]:
    import torch

    from llmctl.core.evaluate.runner import load_scorer

    lm = load_scorer(directory, device=torch.device("cpu"), dtype=torch.float32, batch_size=batch_size)
    start = time.perf_counter()
    scores = lm.loglikelihood(pairs)
    return [s.logprob for s in scores], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--chars", type=int, default=120_000, help="score the first N characters")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llmctl-bench-eval"))
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--strides", default="256,512")
    parser.add_argument("--batch-size", type=int, default=16, help="llmctl's default (CPU passes hold ≤1,024 tokens)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method (best time kept)")
    parser.add_argument("--questions", type=int, default=60, help="multiple-choice questions (0: skip)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's adaptive malloc thresholds (by default both sides run with the fixed "
                             "ones the llmctl CLI sets, see llmctl.runtime.tune_allocator)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from llmctl.runtime import tune_allocator

    tuned = not args.default_malloc and tune_allocator()
    import torch

    text = args.text.read_text(encoding="utf-8")[: args.chars]
    args.dir.mkdir(parents=True, exist_ok=True)
    text_file = args.dir / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    build(args.dir / "model", args.text, args.vocab, args.hidden, args.layers, args.max_length)

    # warm-up: one run each, so first-call costs (allocator, thread pool) hit neither side's timings
    transformers_loop(args.dir / "model", text[:4000], args.max_length, args.max_length)
    llmctl_perplexity(args.dir / "model", text_file, args.max_length, args.max_length, args.batch_size)
    load_before = os.getloadavg()[0]
    rows = []
    for stride in (int(s) for s in args.strides.split(",")):
        hf_s = ours_s = math.inf
        paired = []  # each run's speed-up over the transformers run just before it
        for _ in range(args.repeat):  # alternate the two, keep each one's best time
            hf_ppl, hf_tokens, hf_run = transformers_loop(args.dir / "model", text, args.max_length, stride)
            ours_ppl, ours_tokens, ours_run = llmctl_perplexity(args.dir / "model", text_file, args.max_length,
                                                                stride, args.batch_size)
            hf_s, ours_s = min(hf_s, hf_run), min(ours_s, ours_run)
            paired.append(hf_run / ours_run)
        assert ours_tokens == hf_tokens, (ours_tokens, hf_tokens)
        assert abs(ours_ppl / hf_ppl - 1) < 1e-4, (ours_ppl, hf_ppl)
        rows.append((stride, hf_tokens, hf_ppl, hf_tokens / hf_s, ours_tokens / ours_s, sorted(paired)))
        print(f"stride {stride}: transformers {hf_tokens / hf_s:,.0f} tok/s, llmctl {ours_tokens / ours_s:,.0f} tok/s "
              f"({hf_s / ours_s:.2f}x; paired runs {', '.join(f'{r:.2f}' for r in paired)}), "
              f"perplexity {ours_ppl:.4f} vs {hf_ppl:.4f}", file=sys.stderr)

    choice_row = None
    if args.questions:
        from llmctl.core.evaluate.runner import load_scorer

        lm = load_scorer(args.dir / "model", device=torch.device("cpu"), dtype=torch.float32, batch_size=1)
        pairs = [lm.encode_pair(c, x) for c, x in choice_requests(text, args.questions)]
        hf_s = ours_s = math.inf
        for _ in range(args.repeat):
            hf_sums, seconds = transformers_choice(args.dir / "model", pairs, args.batch_size)
            hf_s = min(hf_s, seconds)
            ours_sums, seconds = llmctl_choice(args.dir / "model", pairs, args.batch_size)
            ours_s = min(ours_s, seconds)
        assert all(abs(a - b) <= 1e-4 * abs(b) + 1e-4 for a, b in zip(ours_sums, hf_sums)), "log-likelihoods differ"
        context = sum(len(c) for c, _ in pairs) / len(pairs)
        continuation = sum(len(x) for _, x in pairs) / len(pairs)
        choice_row = (len(pairs), context, continuation, len(pairs) / hf_s, len(pairs) / ours_s)
        print(f"multiple choice: transformers {len(pairs) / hf_s:.1f} req/s, llmctl {len(pairs) / ours_s:.1f} req/s "
              f"({hf_s / ours_s:.2f}x)", file=sys.stderr)

    command = "python -P benchmarks/eval.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "# Perplexity throughput: llmctl vs the transformers strided loop",
        "",
        f"Command: `{command}`",
        "",
        f"Model: random Llama, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, context "
        f"{args.max_length}; text: first {args.chars:,} characters of {args.text.name}; float32 on CPU "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}). "
        f"llmctl batch size {args.batch_size} (at most 1,024 tokens per pass on CPU), timed including reading and tokenizing the file. "
        f"Best of {args.repeat} alternating runs each. "
        "Perplexities agree within 1e-4 relative (asserted). "
        + ("Both sides run with the malloc thresholds the llmctl CLI sets (`tune_allocator`). " if tuned
           else "glibc's default (adaptive) malloc thresholds on both sides. ") +
        f"1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        "(a shared machine: other jobs compete for the cores, so absolute figures are noisy).",
        "",
        "| max length | stride | tokens scored | perplexity | transformers tok/s | llmctl tok/s | speed-up "
        "(best runs) | paired runs: median (min–max) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stride, tokens, ppl, hf_tps, ours_tps, paired in rows:
        lines.append(f"| {args.max_length} | {stride} | {tokens:,} | {ppl:.2f} | {hf_tps:,.0f} | {ours_tps:,.0f} | "
                     f"{ours_tps / hf_tps:.2f}x | {statistics.median(paired):.2f}x ({paired[0]:.2f}–{paired[-1]:.2f}) |")
    if choice_row:
        n, context, continuation, hf_rps, ours_rps = choice_row
        lines += [
            "",
            f"Multiple choice (HellaSwag-shaped: {n // 4} questions × 4 endings from the same text, "
            f"contexts {context:.0f} tokens and endings {continuation:.0f} tokens on average). transformers: "
            "lm-evaluation-harness's HF scoring (whole rows sorted by length, right-padded batches of "
            f"{args.batch_size}, log_softmax); llmctl: `ScoringModel.loglikelihood` (a shared context runs once, "
            "its KV cache serves the 4 endings). Log-likelihoods agree within 1e-4 (asserted).",
            "",
            "| requests | transformers req/s | llmctl req/s | speed-up |",
            "|---:|---:|---:|---:|",
            f"| {n} | {hf_rps:,.1f} | {ours_rps:,.1f} | {ours_rps / hf_rps:.2f}x |",
        ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
