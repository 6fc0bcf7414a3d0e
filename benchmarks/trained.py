"""The briefly trained `llama`-preset model the prune and quantize-quality benchmarks measure:
trained once per settings on the first 90 % of Tiny Shakespeare (or, `--corpus stdlib`, on
CPython's own library source: 12× more text, for longer runs that do not repeat it), cached
under --dir, reused.

The `llama` preset's architecture (RMSNorm, rope, SwiGLU, grouped-query attention) at a smaller
width, with a byte-level BPE of `vocab_size` trained on the same 90 %; the last 10 % (cut at a
paragraph) is the held-out text. A model lives in DIR/<settings key>/model with `settings.json`
and `trained.json` (steps, wall time, load average) beside it; any other settings train anew,
and an interrupted run resumes from its checkpoint (the time is then the resumed part's).

    python -m benchmarks.trained --dir /tmp/llmctl-trained --width 256 --steps 1500   # train or find it
    model = trained(Path("/tmp/llmctl-trained"), Settings(hidden_size=256, …))          # from a benchmark

Every `llmctl` subprocess runs with OMP_NUM_THREADS=1 unless it is set (on a shared,
oversubscribed 2-core box two spinning threads ran 15x slower than one).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@dataclass(frozen=True)
class Settings:
    hidden_size: int = 128
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    vocab_size: int = 1024
    steps: int = 1200       # of batch_size × seq_len tokens
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1  # `llmctl train`'s default
    seed: int = 0
    corpus: str = "shakespeare"  # or "stdlib": CPython's own library source (CORPORA)

    @property
    def key(self) -> str:
        fields = asdict(self)
        for name, default in NEWER_DEFAULTS.items():  # the keys of models cached before these options stay valid
            if fields[name] == default:
                del fields[name]
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
        return f"llama-d{self.hidden_size}-l{self.num_layers}-s{self.steps}{self.suffix}-{digest}"

    @property
    def suffix(self) -> str:
        """'' for Tiny Shakespeare at the default optimiser settings, else '-CORPUS', '-lrX', '-wdY': for cache
        keys and results files."""
        d = Settings.__dataclass_fields__
        return ("" if self.corpus == "shakespeare" else f"-{self.corpus}") \
            + ("" if self.lr == d["lr"].default else f"-lr{self.lr:g}") \
            + ("" if self.weight_decay == d["weight_decay"].default else f"-wd{self.weight_decay:g}")

    def describe(self) -> str:
        return (f"`llama` preset at d={self.hidden_size}, {self.num_layers} layers, {self.num_heads} heads / "
                f"{self.num_kv_heads} KV heads, SwiGLU {self.intermediate_size}, byte-level BPE {self.vocab_size}; "
                f"{self.steps} steps of {self.batch_size} × {self.seq_len} tokens of {CORPORA[self.corpus][0]}, "
                f"lr {self.lr:g} → {self.min_lr:g}, weight decay {self.weight_decay:g}")


NEWER_DEFAULTS = {"corpus": "shakespeare", "weight_decay": 0.1}  # settings added after models were cached


@dataclass
class Trained:
    """A trained model and its text: `model` (checkpoint), `train`/`val` (text files), `record`
    (trained.json: steps, seconds, load average). `settings` is None for a checkpoint made
    elsewhere (`pretrained`), whose record holds its `name` and description instead."""

    model: Path
    train: Path
    val: Path
    settings: Settings | None
    record: dict
    eval_args: tuple[str, ...] = ()  # extra `llmctl eval` options for its perplexity

    def describe(self, timing: bool = False) -> str:
        """The model, for a results file (`timing`: with its training time and load)."""
        if self.settings is None:
            return self.record["describe"]
        r = self.record
        if not timing:
            return self.settings.describe()
        resumed = "; resumed from a checkpoint: the time is the resumed part's" if r.get("resumed") else ""
        return (f"{self.settings.describe()} ({r['seconds'] / 60:.1f} min on {r['threads']} thread(s), "
                f"load average {r['loadavg'][0]}–{r['loadavg'][1]}{resumed})")

    @property
    def stem(self) -> str:
        """The model's part of a results file's name: d<width><suffix>, or the checkpoint's name."""
        if self.settings is None:
            return self.record["name"]
        return f"d{self.settings.hidden_size}{self.settings.suffix}"

    def perplexity(self, ckpt: Path) -> float:
        """Held-out perplexity of `ckpt` (this model or one made from it)."""
        return perplexity(ckpt, self.val, *self.eval_args)


def llmctl(*args, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m llmctl ARGS` in a subprocess (one thread unless OMP_NUM_THREADS is set)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-m", "llmctl", *map(str, args)], capture_output=True, text=True, env=env)
    if check and proc.returncode:
        raise SystemExit(f"llmctl {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    return proc


def perplexity(ckpt: Path, val: Path, *options: str) -> float:
    """Held-out perplexity of `ckpt` on the text file `val` (`llmctl eval --task perplexity [options]`)."""
    out = llmctl("eval", ckpt, "--task", "perplexity", "--data", val, "--no-record", "--json", "--quiet", *options)
    return next(iter(json.loads(out.stdout)["results"].values()))["perplexity"]["perplexity"]


def shakespeare() -> tuple[str, str]:
    """Tiny Shakespeare's first 90 % and the rest, cut at a paragraph."""
    text = DATA.read_text(encoding="utf-8")
    cut = text.rindex("\n\n", 0, int(len(text) * 0.9))
    return text[:cut], text[cut:]


def stdlib() -> tuple[str, str]:
    """The running CPython's library source (no tests, no site-packages; ~12.6 MB for 3.11), files in
    sorted order; every 40th file (~3 %) is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test"}
    files = sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts))
    texts = [f.read_text(encoding="utf-8", errors="replace").strip() + "\n" for f in files]
    return "\n\n".join(t for i, t in enumerate(texts) if i % 40), "\n\n".join(texts[::40])


CORPORA = {"shakespeare": ("Tiny Shakespeare", shakespeare), "stdlib": ("CPython's library source", stdlib)}


def split(root: Path, corpus: str = "shakespeare") -> tuple[Path, Path]:
    """The corpus's training and held-out text as root/[CORPUS/]train.txt and val.txt."""
    here = root if corpus == "shakespeare" else root / corpus
    here.mkdir(parents=True, exist_ok=True)
    train, val = here / "train.txt", here / "val.txt"
    if not (train.is_file() and val.is_file()):
        texts = CORPORA[corpus][1]()
        for path, text in zip((train, val), texts):
            path.write_text(text, encoding="utf-8")
    return train, val


def trained(root: Path, settings: Settings = Settings()) -> Trained:
    """The model for `settings` under `root`, trained first if it is not there."""
    root.mkdir(parents=True, exist_ok=True)
    train, val = split(root, settings.corpus)
    tok = root / f"tok{'' if settings.corpus == 'shakespeare' else '-' + settings.corpus}-{settings.vocab_size}"
    if not (tok / "tokenizer.json").is_file():
        llmctl("tokenize", "train", train, "--algo", "bytelevel", "--vocab-size", settings.vocab_size, "-o", tok)
    here = root / settings.key
    model, record_file = here / "model", here / "trained.json"
    if not record_file.is_file():
        here.mkdir(exist_ok=True)
        (here / "settings.json").write_text(json.dumps(asdict(settings), indent=1))
        s = settings
        model_args = (f"{{hidden_size: {s.hidden_size}, num_layers: {s.num_layers}, num_heads: {s.num_heads}, "
                      f"num_kv_heads: {s.num_kv_heads}, intermediate_size: {s.intermediate_size}, "
                      f"vocab_size: {s.vocab_size}, max_seq_len: 256}}")
        resume = (model / "checkpoints").is_dir()  # an interrupted run (Ctrl-C/SIGTERM saves one) continues
        load, started = os.getloadavg()[0], time.perf_counter()
        llmctl("train", "model=llama", f"model_args={model_args}", f"data={train}", f"val_data={val}",
               f"tokenizer={tok}", f"max_steps={s.steps}", f"batch_size={s.batch_size}", f"seq_len={s.seq_len}",
               f"lr={s.lr}", f"min_lr={s.min_lr}", f"warmup_steps={s.warmup_steps}", f"seed={s.seed}",
               f"weight_decay={s.weight_decay}",
               "eval_every=0", "save_every=0", "tensorboard=false", "peak_tflops=1", "-o", model,
               "--resume" if resume else "--force")
        record = {"steps": json.loads((model / "llmctl.json").read_text())["step"],
                  "seconds": round(time.perf_counter() - started, 1), "threads": os.environ.get("OMP_NUM_THREADS", "1"),
                  "loadavg": [round(load, 2), round(os.getloadavg()[0], 2)], "resumed": resume}
        record_file.write_text(json.dumps(record))
    return Trained(model, train, val, settings, json.loads(record_file.read_text()))


def pretrained(root: Path, ckpt: Path, val_chars: int = 36_000) -> Trained:
    """A checkpoint made elsewhere (a pretrained model's Hugging Face files), linked as root/<name>/model so
    that what benchmarks make from it lands beside it. Calibration text: Tiny Shakespeare's first 90 %;
    held-out text: the first `val_chars` characters of the rest (cut at a paragraph), read in windows of 512
    tokens (a pretrained model's context is long, and CPU time short)."""
    train, val = split(root)
    short = root / f"val-{val_chars}.txt"
    if not short.is_file():
        text = val.read_text(encoding="utf-8")
        short.write_text(text[: text.index("\n\n", val_chars)], encoding="utf-8")
    ckpt = ckpt.resolve()
    here = root / ckpt.name
    here.mkdir(parents=True, exist_ok=True)
    link = here / "model"
    if link.is_symlink() and link.resolve() != ckpt:
        link.unlink()
    if not link.exists():
        link.symlink_to(ckpt, target_is_directory=True)
    c = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    describe = (f"`{ckpt.name}`, made elsewhere ({c['model_type']}: d={c['hidden_size']}, {c['num_hidden_layers']} "
                f"layers, {c['num_attention_heads']} heads / {c.get('num_key_value_heads', c['num_attention_heads'])} "
                f"KV heads, MLP {c['intermediate_size']}, vocabulary {c['vocab_size']}); held-out text: the first "
                f"{short.stat().st_size:,} bytes of Tiny Shakespeare's last 10 %, in windows of 512 tokens")
    return Trained(link, train, short, None, {"name": ckpt.name, "describe": describe},
                   eval_args=("--max-length", "512", "--stride", "512"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model's options (--dir, --width, --layers, --steps, …), for every benchmark that uses it."""
    d = Settings()
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llmctl-trained"), help="cache of trained models")
    parser.add_argument("--width", type=int, default=d.hidden_size, help="hidden size")
    parser.add_argument("--layers", type=int, default=d.num_layers)
    parser.add_argument("--heads", type=int, default=d.num_heads)
    parser.add_argument("--kv-heads", type=int, default=d.num_kv_heads)
    parser.add_argument("--intermediate", type=int, help="SwiGLU width (default: 3 × width)")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (the floor stays a tenth of it)")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--corpus", choices=sorted(CORPORA), default=d.corpus,
                        help="training text (held out: the last 10 %% of Tiny Shakespeare; every 40th stdlib file)")
    parser.add_argument("--pretrained", type=Path, metavar="CKPT",
                        help="measure this checkpoint (made elsewhere) instead of training one; the model options "
                             "are then ignored")
    parser.add_argument("--val-chars", type=int, default=36_000,
                        help="--pretrained: the held-out text's length in characters")
    parser.add_argument("--outliers", type=float, default=0, metavar="FACTOR",
                        help="make 2 %% of every block linear's input channels FACTOR× larger, the function unchanged "
                             "(benchmarks/outliers.py)")


def from_arguments(args: argparse.Namespace) -> Trained:
    """The model the parsed options describe, trained first if needed."""
    settings = Settings(hidden_size=args.width, num_layers=args.layers, num_heads=args.heads,
                        num_kv_heads=args.kv_heads, intermediate_size=args.intermediate or 3 * args.width,
                        steps=args.steps, corpus=args.corpus, lr=args.lr, weight_decay=args.weight_decay,
                        min_lr=Settings.min_lr if args.lr == Settings.lr else args.lr / 10)
    t = pretrained(args.dir, args.pretrained, args.val_chars) if args.pretrained else trained(args.dir, settings)
    if args.outliers:
        from benchmarks.outliers import with_outliers
        t = with_outliers(t, args.outliers)
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    t = from_arguments(parser.parse_args())
    print(f"{t.model}: {t.describe(timing=True)}; val perplexity {t.perplexity(t.model):.2f}")


if __name__ == "__main__":
    main()
