"""A tiny workspace for the safety tests: corpus, tokenizer, token shards, a checkpoint and a run."""

from __future__ import annotations

import json
from pathlib import Path

FAST = ["model=nano", "batch_size=2", "seq_len=16", "warmup_steps=0", "peak_tflops=1", "tensorboard=false",
        "eval_batches=1"]


def corpus_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:20_000]


def make_workspace(root: Path) -> dict[str, Path]:
    """{"text", "tok", "shards", "ckpt", "run"} under `root` (a few seconds, on CPU)."""
    import torch

    from llmctl.core.data import Corpus, encode_corpus
    from llmctl.core.model import ModelConfig, Transformer
    from llmctl.core.model.io import save_model
    from llmctl.core.tokenizer import TrainSpec, train_tokenizer
    from llmctl.core.train.config import TrainConfig
    from llmctl.core.train.loop import run_training
    from llmctl.config import load_config

    text = root / "corpus.txt"
    text.write_text(corpus_text(), encoding="utf-8")
    tok = train_tokenizer(TrainSpec(algo="bytelevel", vocab_size=300, special_tokens=["<|endoftext|>"]),
                          iter([[p for p in corpus_text().split("\n\n") if p.strip()]]))
    tok.save(root / "tok")
    (root / "shards").mkdir()
    encode_corpus(Corpus([str(text)]), tok, root / "shards", val_fraction=0.1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                                    max_seq_len=64, eos_token_id=tok.eos_id))
    save_model(model, root / "ckpt", tokenizer_dir=root / "tok")
    cfg = load_config(TrainConfig, None, [*FAST, f"data={root / 'shards'}", "max_steps=2"], kind="train")
    run_training(cfg, root / "run")
    return {"text": text, "tok": root / "tok", "shards": root / "shards", "ckpt": root / "ckpt", "run": root / "run",
            "root": root}


def snapshot(*paths: Path) -> dict[str, bytes]:
    """Every file under `paths` → its bytes (to assert that nothing changed)."""
    out = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        out.update({str(f): f.read_bytes() for f in files})
    return out


def one_line_error(result, code: int, *words: str) -> None:
    """`result` failed with `code` and one line on stderr naming each of `words`, no traceback."""
    assert result.code == code, (result.code, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and result.stderr.strip().splitlines()[-1] == lines[0], result.stderr
    assert "Traceback" not in result.stderr and "--debug for the traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")
