"""`llmctl merge` vs `mergekit-yaml`: wall time and peak RSS of the same recipes on a two-model
merge of the `llama` preset (~125M parameters each, float32, ~0.5 GB per model).

Each merge runs as its own process (the whole command: start-up, planning, I/O); its peak RSS
is the child's `ru_maxrss` from `wait4` (this parent never imports torch and stays small, so the
figure is the child's own; the page cache is warmed by another child). The tools alternate
run by run, so a machine shared with other work loads both alike; the load average is reported.

    python -P benchmarks/merge.py --dir /tmp/llmctl-bench-merge --out benchmarks/results/merge.md
"""

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from llmctl.core.checkpoint import DTYPES, read_safetensors_header

BASE, OTHER = "a", "b"
RECIPES = {
    "linear": {"merge_method": "linear", "models": [{"model": BASE, "parameters": {"weight": 0.5}},
                                                   {"model": OTHER, "parameters": {"weight": 0.5}}]},
    "slerp": {"merge_method": "slerp", "base_model": BASE, "models": [{"model": BASE}, {"model": OTHER}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"value": 0.5}]}},
    "ties": {"merge_method": "ties", "base_model": BASE,
             "models": [{"model": OTHER, "parameters": {"weight": 1.0, "density": 0.5}}]},
    "dare_ties": {"merge_method": "dare_ties", "base_model": BASE,
                  "models": [{"model": OTHER, "parameters": {"weight": 1.0, "density": 0.5}}]},
    "passthrough": {"merge_method": "passthrough",
                    "slices": [{"sources": [{"model": BASE, "layer_range": [0, 8]}]},
                               {"sources": [{"model": OTHER, "layer_range": [4, 12]}]}]},
}


def build(directory: Path) -> None:
    """Two llama-preset checkpoints with different seeds (llmctl's writer, HF Llama format)."""
    import torch

    from llmctl.config import load_config
    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model
    from llmctl.core.model.io import save_model

    cfg = load_config(ModelConfig, "llama", kind="model")
    for seed, name in enumerate((BASE, OTHER)):
        if not (directory / name).exists():
            torch.manual_seed(seed)
            save_model(build_model(cfg), directory / name)


def timed(command: list[str], cwd: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one command run as a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llmctl-bench-merge"))
    parser.add_argument("--methods", default=",".join(RECIPES))
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool and method (the best is kept)")
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.build:
        return build(args.dir)
    subprocess.run([sys.executable, "-P", __file__, "--dir", str(args.dir), "--build"], check=True)
    mergekit = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    largest = max(math.prod(shape) * DTYPES[dtype][1] for shape, dtype in _layout(args.dir / BASE)) / 2**20
    files = [str(f) for name in (BASE, OTHER) for f in (args.dir / name).glob("*.safetensors")]
    subprocess.run([sys.executable, "-c", "import sys\nfor f in sys.argv[1:]: open(f, 'rb').read()", *files],
                   check=True)  # warm the page cache (in a child: a fork would carry this RSS into the next)
    baseline = {lib: timed([sys.executable, "-c", f"import {lib}, llmctl.core.merge"], args.dir)[1]
                for lib in ("torch", "numpy")}
    load = [os.getloadavg()[0]]
    rows = []
    for method in args.methods.split(","):
        (args.dir / f"{method}.yaml").write_text(yaml.safe_dump(RECIPES[method], sort_keys=False))
        outputs = {"llmctl": f"out-{method}", "mergekit": f"mk-{method}"}
        tools = {
            "llmctl": [sys.executable, "-m", "llmctl", "merge", "--config", f"{method}.yaml", "-o", outputs["llmctl"],
                       "--quiet"],
            "mergekit": [mergekit, f"{method}.yaml", outputs["mergekit"], "--no-copy-tokenizer", "--no-write-model-card",
                         "--quiet"],
        }
        runs = {tool: [] for tool in tools}
        for _ in range(args.repeat):
            for tool, command in tools.items():
                shutil.rmtree(args.dir / outputs[tool], ignore_errors=True)  # deleting the last output is not timed
                runs[tool].append(timed(command, args.dir))
                print(method, tool, runs[tool][-1], file=sys.stderr)
        rows.append((method, {tool: min(r) for tool, r in runs.items()}))
        load.append(os.getloadavg()[0])
    lines = [f"Two `llama`-preset checkpoints (~125M parameters, float32, one "
             f"{(args.dir / BASE / 'model.safetensors').stat().st_size / 2**20:.0f} MiB file each); largest tensor "
             f"{largest:.0f} MiB; `import torch, llmctl.core.merge` alone peaks at {baseline['torch']:.0f} MiB, "
             f"`import numpy, llmctl.core.merge` (the numpy back end, which every method here runs on) at "
             f"{baseline['numpy']:.0f} MiB. Best of {args.repeat} run(s) per tool, alternating, each the whole command "
             f"in a fresh process; load average (1 min) {min(load):.1f}–{max(load):.1f} during the runs.", "",
             "| method | llmctl (s) | mergekit-yaml (s) | speed-up | llmctl peak RSS (MiB) | mergekit peak RSS (MiB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, f in rows:
        (ls, lm), (ms, mm) = f["llmctl"], f["mergekit"]
        lines.append(f"| {method} | {ls:.2f} | {ms:.2f} | {ms / ls:.1f}× | {lm:.0f} | {mm:.0f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        command = "python -P benchmarks/merge.py " + " ".join(sys.argv[1:])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Merge: llmctl vs mergekit-yaml\n\nCommand (from the repo root):\n\n    {command}\n\n{report}")


def _layout(path: Path):
    """(shape, safetensors dtype code) of every tensor, from the header (no torch)."""
    header, _ = read_safetensors_header(path / "model.safetensors")
    return [(e["shape"], e["dtype"]) for n, e in header.items() if n != "__metadata__"]


if __name__ == "__main__":
    main()
