"""Decode speed: `llmctl.core.generate` vs transformers' generate(), greedy, CPU.

    python -m benchmarks.generate [--sizes small,base] [--new-tokens 128] [--batch 16] [--repeats 3] [--compile]

Random-weight Llamas built from transformers configs (no download): `small` ≈12M params
(d=384, 6 layers, 6 heads, 2 KV heads, vocab 4096) and `base` ≈120M (d=768, 12 layers,
12 heads, 4 KV heads, vocab 32000). Both sides load the same safetensors checkpoint, decode
the same 32-token prompt with EOS disabled, so they produce the same number of tokens.
Decode tokens/s = (N − 1) / (time(N new tokens) − time(1 new token)), best of `--repeats`, so
prefill is excluded identically on both sides. Memory-bandwidth share = model bytes × decode
tokens/s ÷ copy bandwidth (bytes read + written per second by a large `tensor.copy_`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import transformers

from llmctl.core.generate import GenerationConfig, generate
from llmctl.core.model.io import load_model

SIZES = {
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=4096),
    "base": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000),
}
PROMPT_LEN = 32


class IdTok:
    """Prompts are given as ids; text is irrelevant here."""

    stop_ids: list[int] = []

    def __init__(self, prompts: dict[str, list[int]]):
        self.prompts = prompts

    def encode(self, text, add_special_tokens=False):
        return self.prompts[text]

    def decode(self, ids, skip_special_tokens=False):
        return ""


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second moved (read + write) by a large tensor copy."""
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_time(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * 4 / best


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build(size: str, root: Path) -> Path:
    cfg = transformers.LlamaConfig(**SIZES[size], max_position_embeddings=1024, tie_word_embeddings=False,
                                   eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = root / size
    model.save_pretrained(path)
    return path


def bench(size: str, path: Path, new_tokens: int, batch: int, repeats: int, compile: bool) -> dict:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    ours, _ = load_model(path, dtype=torch.float32)
    vocab = SIZES[size]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompts = {f"p{i}": torch.randint(1, vocab, (PROMPT_LEN,), generator=g).tolist() for i in range(batch)}
    tok = IdTok(prompts)

    def run_hf(names: list[str], n: int) -> list[list[int]]:
        ids = torch.tensor([prompts[p] for p in names])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, eos_token_id=None, pad_token_id=0)
        return out[:, PROMPT_LEN:].tolist()

    def runner(compiled: bool):
        def run_ours(names: list[str], n: int) -> list[list[int]]:
            cfg = GenerationConfig(max_new_tokens=n, eos_ids=[], batch_size=len(names), compile=compiled)
            return [r.tokens for r in generate(ours, tok, names, cfg)]
        return run_ours

    runs = {"hf": run_hf, "ours": runner(False)}
    if compile:
        runs["compiled"] = runner(True)

    def decode_rates(names: list[str]) -> dict[str, float]:
        """Decode tokens/s per contender; runs interleaved so machine load hits all alike."""
        best = {name: [float("inf"), float("inf")] for name in runs}
        for _ in range(repeats):
            for name, times in best.items():
                times[0] = min(times[0], _time(lambda: runs[name](names, new_tokens)))
                times[1] = min(times[1], _time(lambda: runs[name](names, 1)))
        return {name: len(names) * (new_tokens - 1) / (t[0] - t[1]) for name, t in best.items()}

    for names in (["p0"], list(prompts)):  # warm-up (compiles the decode step for both batch shapes)
        for run in runs.values():
            run(names, 4)
    reference = run_hf(["p0"], new_tokens)
    row = {
        "size": size,
        "params_M": round(sum(p.numel() for p in ours.parameters()) / 1e6, 1),
        "model_MB": round(sum(p.numel() * p.element_size() for p in ours.parameters()) / 1e6, 1),
        "identical_greedy": all(run(["p0"], new_tokens) == reference for run in runs.values()),
    }
    for b, names in ((1, ["p0"]), (batch, list(prompts))):
        if b == 1 or batch > 1:
            for name, rate in decode_rates(names).items():
                row[f"{name}_b{b}"] = rate
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="small,base")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="also time llmctl's compiled decode step (--compile)")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = copy_bandwidth()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"copy bandwidth {bandwidth / 1e9:.2f} GB/s, load average {os.getloadavg()[0]:.1f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            row = bench(size, build(size, Path(tmp)), args.new_tokens, args.batch, args.repeats, args.compile)
            row["bandwidth_share_b1"] = row["model_MB"] * 1e6 * max(row["ours_b1"], row.get("compiled_b1", 0)) / bandwidth
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    print()
    extra = " llmctl --compile tok/s | speed-up |" if args.compile else ""
    print(f"| model | params | batch | HF tok/s | llmctl tok/s | speed-up |{extra}")
    print("|---|---|---|---|---|---|" + ("---|---|" if args.compile else ""))
    for r in rows:
        for b in sorted({1, args.batch}):
            if f"ours_b{b}" in r:
                hf_, us = r[f"hf_b{b}"], r[f"ours_b{b}"]
                line = f"| {r['size']} | {r['params_M']}M | {b} | {hf_:.1f} | {us:.1f} | {us / hf_:.2f}× |"
                if args.compile:
                    line += f" {r[f'compiled_b{b}']:.1f} | {r[f'compiled_b{b}'] / hf_:.2f}× |"
                print(line)
    for r in rows:
        print(f"{r['size']}: batch-1 decode reads {r['model_MB']} MB/token → {r['bandwidth_share_b1']:.0%} of the "
              f"copy-bandwidth bound; greedy tokens identical to HF: {r['identical_greedy']}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
