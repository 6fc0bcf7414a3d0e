"""Peak RSS of loading a checkpoint: llmctl's memory-mapped reader vs the file size,
`transformers.from_pretrained`, and a naive read-then-deserialize load.

Writes a ≥500 MB Llama-architecture checkpoint with `save_checkpoint` (once, kept in --dir),
then loads it in a fresh subprocess per method and reports the peak resident set size (VmHWM
of /proc/self/status: unlike `ru_maxrss` it is not inherited from the parent across fork) above
the RSS right after imports, so interpreter and library footprints cancel.
The file is read from a warm page cache in every case; mapped pages count in RSS once touched.

    python benchmarks/checkpoint_load.py --dir /tmp/llmctl-bench-ckpt --out benchmarks/results/checkpoint_load.md
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "llmctl-state-dict": "llmctl `open_checkpoint(d).state_dict()`, every tensor read (sum)",
    "llmctl-into-module": "llmctl state_dict → `LlamaForCausalLM` built on meta, `load_state_dict(assign=True)`",
    "transformers": "`LlamaForCausalLM.from_pretrained(d, dtype=float32)`",
    "naive": "`safetensors.torch.load(open(f, 'rb').read())` (read the file, then deserialize)",
}


def build(directory: Path, hidden: int, layers: int, vocab: int) -> None:
    import torch
    import transformers

    from llmctl.core.checkpoint import save_checkpoint

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                      num_key_value_heads=hidden // 256, max_position_embeddings=2048,
                                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in transformers.LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
    save_checkpoint(directory, tensors, config.to_dict(), lineage={"command": "benchmark"})


def _peak_rss() -> int:
    """High-water resident set size of this process, in bytes (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def child(method: str, directory: str) -> dict:
    """Run in a fresh process: load with `method`, return RSS figures in MiB and the time."""
    import psutil
    import torch
    import transformers
    from safetensors.torch import load

    from llmctl.core.checkpoint import open_checkpoint

    _ = transformers.LlamaForCausalLM, transformers.AutoConfig  # import the lazy modules before measuring
    base = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if method.startswith("llmctl"):
        state = open_checkpoint(directory).state_dict()
        checksum = sum(float(t.float().sum()) for t in state.values())
        if method == "llmctl-into-module":
            config = transformers.AutoConfig.from_pretrained(directory)
            with torch.device("meta"):
                model = transformers.LlamaForCausalLM(config)
            model.load_state_dict(state, assign=True)
            checksum = sum(float(p.sum()) for p in model.parameters())
    elif method == "transformers":
        model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
        checksum = sum(float(p.sum()) for p in model.parameters())
    elif method == "naive":
        with open(Path(directory) / "model.safetensors", "rb") as f:
            state = load(f.read())
        checksum = sum(float(t.sum()) for t in state.values())
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - start
    peak = _peak_rss()
    return {"method": method, "base_mib": base / 2**20, "peak_mib": peak / 2**20,
            "delta_mib": (peak - base) / 2**20, "seconds": seconds, "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llmctl-bench-ckpt"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "build":
        build(args.dir, args.hidden, args.layers, args.vocab)
        return
    if args.child:
        print(json.dumps(child(args.child, str(args.dir))))
        return

    if not args.dir.exists():  # in a subprocess, so this process stays small
        subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--hidden", str(args.hidden),
                        "--layers", str(args.layers), "--vocab", str(args.vocab), "--child", "build"], check=True)
    size = (args.dir / "model.safetensors").stat().st_size / 2**20
    rows = []
    for method in METHODS:
        proc = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--child", method],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr)

    lines = [
        f"Checkpoint: Llama architecture, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, float32, "
        f"one `model.safetensors` of {size:.0f} MiB (warm page cache).",
        "",
        "| method | RSS after imports (MiB) | peak RSS (MiB) | peak − imports (MiB) | × file size | load + read (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {METHODS[r['method']]} | {r['base_mib']:.0f} | {r['peak_mib']:.0f} | {r['delta_mib']:.0f} | "
                     f"{r['delta_mib'] / size:.2f} | {r['seconds']:.2f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        command = "python benchmarks/checkpoint_load.py " + " ".join(sys.argv[1:])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Checkpoint load: peak RSS\n\nCommand (from the repo root):\n\n    {command}\n\n{report}")


if __name__ == "__main__":
    main()
