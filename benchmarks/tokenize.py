"""Encode throughput and peak memory: `llmctl tokenize encode` vs a raw `tokenizers` loop.

Builds a ≥200 MB corpus (tinyshakespeare repeated) and a byte-level BPE tokenizer trained on
tinyshakespeare in a temporary directory, then runs, each in a fresh process on a warm page cache:

    llmctl          `llmctl tokenize encode BIG --tokenizer TOK -o OUT` (shards written to disk)
    encode_batch    the raw library loop: read the file, split paragraphs, `Tokenizer.encode_batch`
                    on ~1 MB batches, read every `.ids` (no files written)
    encode_batch_fast  the same with `encode_batch_fast` (no offsets)

Throughput is input MB (10^6 bytes) per second of the encoding loop (llmctl: the time the
command reports; its whole-process wall time, start-up included, is shown too). Peak RSS is
the process's VmHWM (/proc/self/status), read by the process itself at exit.

    python benchmarks/tokenize.py --mb 200 --out benchmarks/results/tokenize.md
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def _peak_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def child(method: str, corpus: str, tokdir: str, out: str) -> dict:
    """Run in a fresh process; returns seconds of the encoding loop, tokens and peak RSS."""
    start_process = time.perf_counter()
    if method == "llmctl":
        import contextlib
        import io

        from llmctl.cli import main

        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = main(["tokenize", "encode", corpus, "--tokenizer", tokdir, "-o", out, "--quiet", "--json"])
        if code != 0:
            raise SystemExit(f"llmctl exited with {code}")
        result = json.loads(stdout.getvalue())
        seconds, tokens = result["seconds"], result["tokens"]
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(tokdir) / "tokenizer.json"))
        encode = getattr(tok, method)
        splitter = re.compile(r"\n[ \t\r\f\v]*\n\s*")
        start = time.perf_counter()
        tokens, carry = 0, ""
        with open(corpus, encoding="utf-8") as f:
            while chunk := f.read(1 << 20):
                docs = splitter.split(carry + chunk)
                carry = docs.pop()
                tokens += sum(len(e.ids) for e in encode([d for d in docs if d.strip()], add_special_tokens=False))
        if carry.strip():
            tokens += len(encode([carry], add_special_tokens=False)[0].ids)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "wall": time.perf_counter() - start_process, "tokens": tokens,
            "peak_rss_mb": _peak_rss_mb(), "cpu_s": sum(os.times()[:2])}


def run_child(method: str, corpus: Path, tokdir: Path, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", method, str(corpus), str(tokdir), str(out)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare(workdir: Path, mb: int, vocab: int) -> tuple[Path, Path]:
    from llmctl.core.data.corpus import Corpus
    from llmctl.core.tokenizer import TrainSpec, train_tokenizer

    text = SHAKESPEARE.read_text(encoding="utf-8").rstrip("\n") + "\n\n"
    repeats = -(-mb * 10**6 // len(text.encode()))
    corpus = workdir / "corpus.txt"
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(repeats):
            f.write(text)
    tok = train_tokenizer(TrainSpec(algo="bytelevel", vocab_size=vocab), Corpus([str(SHAKESPEARE)]).batches())
    tok.save(workdir / "tok")
    return corpus, workdir / "tok"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="corpus size in MB (tinyshakespeare repeated)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--out", type=Path, help="write a Markdown report here")
    args = parser.parse_args()

    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="llmctl-bench-tok-") as tmp:
        workdir = Path(tmp)
        corpus, tokdir = prepare(workdir, args.mb, args.vocab)
        size = corpus.stat().st_size
        results = {}
        for method in ("encode_batch", "llmctl", "encode_batch_fast"):
            results[method] = run_child(method, corpus, tokdir, workdir / f"out-{method}")
            r = results[method]
            print(f"{method:18s} {size / 1e6 / r['seconds']:6.2f} MB/s  {r['seconds']:6.1f} s  "
                  f"cpu {r['cpu_s'] / r['wall']:.2f} cores  peak RSS {r['peak_rss_mb']:6.0f} MB  "
                  f"tokens {r['tokens']:,}", flush=True)
        shards = sorted((workdir / "out-llmctl").glob("*.bin"))

    base = results["encode_batch"]
    lines = [
        "## Tokenize: encode throughput and memory (`benchmarks/tokenize.py`)",
        "",
        f"`python benchmarks/tokenize.py --mb {args.mb} --vocab {args.vocab}` — a {size / 1e6:.0f} MB corpus "
        f"(tinyshakespeare repeated), byte-level BPE with {args.vocab} tokens trained on tinyshakespeare; "
        "each method in a fresh process, warm page cache, 2 cores.",
        "",
        "| method | MB/s | vs `encode_batch` | encode s | process wall s | CPU s | CPU cores used | peak RSS MB "
        "| tokens |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, r in results.items():
        name = "`llmctl tokenize encode` (writes shards)" if method == "llmctl" else f"raw `{method}` loop"
        lines.append(
            f"| {name} | {size / 1e6 / r['seconds']:.2f} | {base['seconds'] / r['seconds']:.2f}× | "
            f"{r['seconds']:.1f} | {r['wall']:.1f} | {r['cpu_s']:.1f} | {r['cpu_s'] / r['wall']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | "
            f"{r['tokens']:,} |"
        )
    lines += [
        "",
        f"llmctl's token count includes one EOS per document; it wrote {len(shards)} shard file(s). "
        f"Load average (1 min) before/after: {load[0]:.1f}/{os.getloadavg()[0]:.1f} — other processes share "
        "the 2 cores, so compare the rows with each other, and CPU s for the work done. "
        "Goals: ≥0.9× the raw library's throughput, peak RSS < 500 MB whatever the corpus size.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(*sys.argv[2:6])))
    else:
        main()
