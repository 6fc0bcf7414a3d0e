"""Start-up time: `llmctl --help` and a TAB completion vs `python -c "import torch"`.

    python benchmarks/startup.py [--repeat 10]

Each is run as a fresh process `repeat` times; the median wall time is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CASES = {
    "llmctl --help": ([sys.executable, "-m", "llmctl", "--help"], {}),
    "llmctl TAB completion": (
        [sys.executable, "-m", "llmctl"],
        {"_LLMCTL_COMPLETE": "complete_bash", "COMP_WORDS": "llmctl to", "COMP_CWORD": "1"},
    ),
    'python -c "import torch"': ([sys.executable, "-c", "import torch"], {}),
    "python -c pass (interpreter floor)": ([sys.executable, "-c", "pass"], {}),
}


def median_seconds(cmd: list[str], env: dict[str, str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    results = {name: median_seconds(cmd, env, args.repeat) for name, (cmd, env) in CASES.items()}
    torch_time = results['python -c "import torch"']
    print(f"{'case':40s} {'median s':>9s} {'vs import torch':>16s}")
    for name, seconds in results.items():
        print(f"{name:40s} {seconds:9.3f} {seconds / torch_time:15.2f}x")


if __name__ == "__main__":
    main()
