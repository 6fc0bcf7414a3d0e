"""GGUF export: llama.cpp decode tok/s on exported files vs llmctl's decode, and export cost.

    python -m benchmarks.gguf_decode [--size small] [--export-sizes small,base] [--new-tokens 128] [--repeats 2]

One random-weight Llama (`benchmarks.generate`'s sizes, no download) is exported to f32, f16,
q8_0, q4_0 and q4_k_m. Decode tokens/s at batch 1 after the same 32-token prompt, greedy:
llama.cpp (llama-cpp-python, one `eval` per token) on each file, llmctl (`core.generate`) at
the nearest precision it has (float32, float16, bfloat16, nf4 for 4 bits); both count
(N − 1) / (time(N new tokens) − time(1 new token)), best of `--repeats`, same thread count.
Export time and peak anonymous memory (RssAnon above the post-import baseline, sampled every
2 ms in a child process; the checkpoint itself is memory-mapped) per type and model size,
beside the largest tensor and the model size: streaming keeps it near one tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.generate import PROMPT_LEN, SIZES, IdTok, _time, build
from llmctl.core.generate import GenerationConfig, generate
from llmctl.core.model.io import load_model

TYPES = ["f32", "f16", "q8_0", "q4_0", "q4_k_m"]
LLMCTL = {"f32": "float32", "f16": "float16", "q8_0": None, "q4_0": "nf4", "q4_k_m": None}

_EXPORT = """
import json, sys, threading, time
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
from llmctl.core.export.gguf import GGUFExporter
import gguf, numpy, torch  # imported before the baseline
peak, base, done = [0], anon(), []
def sample():
    while not done:
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
GGUFExporter().export(sys.argv[1], sys.argv[2], type=sys.argv[3], force=True)
seconds = time.perf_counter() - start
done.append(1)
print(json.dumps({"seconds": seconds, "peak_anon": max(peak[0], anon()) - base}))
"""


def export(path: Path, out: Path, type: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _EXPORT, str(path), str(out), type],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def llama_cpp_rate(path: Path, prompt: list[int], new_tokens: int, repeats: int, threads: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=PROMPT_LEN + new_tokens + 8, n_threads=threads, n_batch=PROMPT_LEN,
                logits_all=True, verbose=False)

    def run(n: int) -> list[int]:
        llm.reset()
        llm.eval(prompt)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if len(out) < n:
                llm.eval([out[-1]])
        return out

    run(4)
    long = min(_time(lambda: run(new_tokens)) for _ in range(repeats))
    short = min(_time(lambda: run(1)) for _ in range(repeats))
    llm.close()
    return (new_tokens - 1) / (long - short)


def llmctl_rate(path: Path, precision: str, prompt: list[int], new_tokens: int, repeats: int) -> float:
    if precision == "nf4":
        from llmctl.core.quant.nf4 import NF4

        model, _ = load_model(path, dtype=torch.float32, transforms=[NF4()])
    else:
        model, _ = load_model(path, dtype=getattr(torch, precision))
    tok = IdTok({"p": prompt})

    def run(n: int):
        return generate(model, tok, ["p"], GenerationConfig(max_new_tokens=n, eos_ids=[], batch_size=1))

    run(4)
    long = min(_time(lambda: run(new_tokens)) for _ in range(repeats))
    short = min(_time(lambda: run(1)) for _ in range(repeats))
    return (new_tokens - 1) / (long - short)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--export-sizes", default="small,base")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import llama_cpp

    print(f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, threads {args.threads}, "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        print("\n| model | float32 MiB | largest tensor MiB | GGUF type | export s | export peak anon MiB |")
        print("|---|---|---|---|---|---|")
        for size in args.export_sizes.split(","):
            path = build(size, Path(tmp))
            model, _ = load_model(path)
            params = sum(p.numel() for p in model.parameters())
            largest = max(p.numel() for p in model.parameters()) * 4
            del model
            for type in ("f32", "q8_0", "q4_k_m"):
                cost = export(path, Path(tmp) / f"{size}-{type}.gguf", type)
                print(f"| {size} ({params / 1e6:.0f}M) | {params * 4 / 2**20:.0f} | {largest / 2**20:.0f} | {type} | "
                      f"{cost['seconds']:.1f} | {cost['peak_anon'] / 2**20:.0f} |", flush=True)
        path = build(args.size, Path(tmp))
        prompt = torch.randint(1, SIZES[args.size]["vocab_size"], (PROMPT_LEN,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        print(f"\ndecode, model {args.size}, batch 1, {args.new_tokens} new tokens")
        print("\n| GGUF type | file MiB | llama.cpp tok/s | llmctl precision | llmctl tok/s |")
        print("|---|---|---|---|---|")
        for type in TYPES:
            out = Path(tmp) / f"m-{type}.gguf"
            export(path, out, type)
            rate = llama_cpp_rate(out, prompt, args.new_tokens, args.repeats, args.threads)
            ours = LLMCTL[type]
            ours_rate = f"{llmctl_rate(path, ours, prompt, args.new_tokens, args.repeats):.1f}" if ours else "—"
            print(f"| {type} | {out.stat().st_size / 2**20:.1f} | {rate:.1f} | {ours or '—'} | {ours_rate} |",
                  flush=True)
        print(f"\nllmctl bfloat16: {llmctl_rate(path, 'bfloat16', prompt, args.new_tokens, args.repeats):.1f} tok/s")


if __name__ == "__main__":
    main()
