"""The native decode step's attention alone: µs per token over every layer's cached keys and values.

Compiles `llmctl/core/native/decode.cpp` — as checked out, and as it was at `--against REV` — into a
small harness that calls its `attend` for each of L layers of a bf16 cache [1, H, len, D] at depth n
(the 97.5M Llama of the quantize benchmark: 12 layers, 12 heads of 64), the two versions in turns,
best of `--calls` per round, each round and version in a process of its own (both libraries register
the same torch classes). The products are left out: at depth they hide the attention in the noise of
this shared host.

    python -m benchmarks.attention --against c237884~1 [--depths 8 256 512 1023] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "llmctl" / "core" / "native"
HARNESS = r'''
#include "SOURCE"
#include <chrono>
#include <torch/extension.h>
double time_attention(int64_t L, int64_t H, int64_t D, int64_t len, int64_t n, int64_t calls) {
  llmctl::Layer layer;
  layer.heads = H; layer.kv_heads = H; layer.head_dim = D; layer.window = 0;
  std::vector<at::Tensor> K, V;
  for (int64_t l = 0; l < L; ++l) {
    K.push_back(at::randn({1, H, len, D}).to(at::kBFloat16));
    V.push_back(at::randn({1, H, len, D}).to(at::kBFloat16));
  }
  std::vector<float> q(H * D, 0.1f), out(H * D);
  double best = 1e30;
  for (int64_t c = 0; c < calls; ++c) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t l = 0; l < L; ++l) llmctl::attend<c10::BFloat16>(layer, q.data(), K[l], V[l], 0, n - 1, out.data());
    best = std::min(best, std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("time_attention", &time_attention); }
'''


def harness(name: str, source: Path, work: Path):
    """The harness around `source` (a decode.cpp), built in `work`."""
    from torch.utils import cpp_extension

    from llmctl.core.native import CFLAGS

    cpp = work / f"{name}.cpp"
    cpp.write_text(HARNESS.replace("SOURCE", str(source)))
    build = work / f"build-{name}"
    build.mkdir(exist_ok=True)
    return cpp_extension.load(name=f"attention_{name}", sources=[str(cpp), str(NATIVE / "matvec.cpp")],
                              extra_cflags=[*CFLAGS, f"-I{NATIVE}"], build_directory=str(build), verbose=False)


def run(name: str, source: Path, work: Path, args) -> list[float]:
    """One round in a child process: µs per token at each depth."""
    code = (f"import sys, json, torch; sys.path.insert(0, {str(ROOT)!r}); torch.set_num_threads({args.threads}); "
            f"from benchmarks.attention import harness; from pathlib import Path; "
            f"lib = harness({name!r}, Path({str(source)!r}), Path({str(work)!r})); "
            f"print(json.dumps([lib.time_attention(12, 12, 64, {max(args.depths)}, n, {args.calls}) "
            f"for n in {args.depths!r}]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="a git revision whose decode.cpp is the baseline")
    ap.add_argument("--depths", type=int, nargs="+", default=[8, 256, 512, 1023])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmctl-bench-attention-") as tmp:
        work = Path(tmp)
        old = work / "decode_against.cpp"
        old.write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{args.against}:llmctl/core/native/decode.cpp"],
                                      check=True, capture_output=True, text=True).stdout)
        versions = {args.against: ("against", old), "checked out": ("here", NATIVE / "decode.cpp")}
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for label, (name, source) in versions.items():
                for n, t in zip(args.depths, run(name, source, work, args)):
                    times.setdefault((label, n), []).append(t)
    print(f"torch {torch.__version__}, {args.threads} threads; µs per token for 12 layers × 12 heads × 64, bf16 cache; "
          f"best of {args.calls} calls, median [range] of {args.rounds} rounds\n")
    print("| depth | MB read | " + " | ".join(versions) + " | ratio | checked out, GB/s |")
    print("|---:|---:|" + "---:|" * (len(versions) + 2))
    for n in args.depths:
        mb = 2 * 12 * 12 * 64 * 2 * n / 1e6
        med = {name: statistics.median(times[name, n]) for name in versions}
        cells = [f"{med[name]:.0f} [{min(times[name, n]):.0f}–{max(times[name, n]):.0f}]" for name in versions]
        print(f"| {n} | {mb:.1f} | " + " | ".join(cells)
              + f" | {med[args.against] / med['checked out']:.2f}× | {mb * 1e3 / med['checked out']:.1f} |")


if __name__ == "__main__":
    main()
