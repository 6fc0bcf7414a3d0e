"""Bounded fuzz of every command's input readers (issue 14): random bytes, truncated files and
mutated JSON into checkpoints, tokenizers, shard manifests, metrics, prompt files, task and train
configs. Each run must end in one clear line (exit 1 or 2, or 0 if the input happens to be valid),
never a traceback or an unanticipated exception, and must not modify its input. Fixed seed."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from _safety import FAST, make_workspace, snapshot

SEED = 14
KEYS = ["format", "version", "dtype", "splits", "train", "val", "shards", "file", "tokens", "documents", "tokenizer",
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "model_type", "weight_map",
        "step", "loss", "val_loss", "lr", "prompt", "messages", "role", "content", "type", "dataset", "path",
        "chat_template", "eos_token", "model", "version", "added_tokens", "id", "name", "max_seq_len"]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2, 7, 255, 65535, 2**31, 2**63, -(2**40), rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.0, -1.5, 1e308, 1e-308, 0.5, rng.random()])
    if kind in (4, 5):
        return rng.choice(["", "../../etc/passwd", "/etc/hostname", "uint16", "float32", "llama", "llmctl-tokens",
                           "model.safetensors", "x" * 300, "\u0000", "\ud7ff", "{{ 1 }}", rng.choice(KEYS)])
    if kind in (6, 7):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def mutate(value, rng: random.Random):
    """`value` with one random node replaced (or, at the top, the whole value)."""
    if rng.random() < 0.15 or not isinstance(value, (dict, list)) or not value:
        return random_value(rng)
    value = json.loads(json.dumps(value))
    keys = list(value) if isinstance(value, dict) else list(range(len(value)))
    key = rng.choice(keys)
    value[key] = mutate(value[key], rng)
    return value


def corrupt(path: Path, rng: random.Random) -> None:
    """Random bytes, a truncation, or (for JSON) a mutation of the file at `path`."""
    data = path.read_bytes()
    how = rng.randrange(4) if path.suffix in (".json", ".jsonl") else rng.randrange(2)
    if how == 0:
        path.write_bytes(rng.randbytes(rng.choice([0, 1, 7, 64, 4096])))
    elif how == 1:
        path.write_bytes(data[: rng.randrange(max(len(data), 1))])
    elif path.suffix == ".jsonl":
        lines = data.decode("utf-8", "replace").splitlines() or ["{}"]
        k = rng.randrange(len(lines))
        try:
            lines[k] = json.dumps(mutate(json.loads(lines[k]), rng))
        except ValueError:
            lines[k] = json.dumps(random_value(rng))
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text(json.dumps(mutate(json.loads(data), rng)), encoding="utf-8")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ws")
    found = make_workspace(root)
    (root / "prompts.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n" +
                                        json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (root / "docs.jsonl").write_text(json.dumps({"q": "a", "choices": ["x", "y"], "answer": 0}) + "\n")
    (root / "task.json").write_text(json.dumps({"name": "t", "type": "multiple_choice", "dataset": {"path": str(
        root / "docs.jsonl")}, "prompt": "{{ q }}", "choices": "choices", "gold": "answer"}))
    (root / "recipe.json").write_text(json.dumps({"model": "nano", "data": [str(found["shards"])], "max_steps": 1,
                                                  "batch_size": 2, "seq_len": 16}))
    return {**found, "prompts": root / "prompts.jsonl", "task": root / "task.json", "recipe": root / "recipe.json"}


# (input to corrupt, files in it, command) — `{X}` is the corrupted copy, `{ws[k]}` the workspace
CASES = {
    "info": ("ckpt", ["config.json", "model.safetensors", "llmctl.json", "generation_config.json"],
             lambda x, ws, out: ["info", x], 14),
    "tokenizer": ("tok", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"],
                  lambda x, ws, out: ["tokenize", "inspect", "hello", "-t", x], 10),
    "shards": ("shards", ["manifest.json", "train-00000.bin", "tokenizer/tokenizer.json"],
               lambda x, ws, out: ["tokenize", "decode", "-t", ws["tok"], "--shard", x, "--limit", "20"], 12),
    "train-data": ("shards", ["manifest.json", "val-00000.bin"],
                   lambda x, ws, out: ["train", *FAST, f"data={x}", "max_steps=0", "-o", out], 6),
    "train-recipe": ("recipe", [""], lambda x, ws, out: ["train", "-c", x, "-o", out], 6),
    "plot": ("run", ["metrics.jsonl"], lambda x, ws, out: ["plot", x, "--width", "40"], 10),
    "generate-input": ("prompts", [""], lambda x, ws, out: ["generate", ws["ckpt"], "--input", x, "-n", "1"], 5),
    "generate-ckpt": ("ckpt", ["config.json", "tokenizer_config.json", "model.safetensors"],
                      lambda x, ws, out: ["generate", x, "hi", "-n", "1"], 5),
    "eval-task": ("task", [""], lambda x, ws, out: ["eval", ws["ckpt"], "--task", x, "--no-record"], 5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fuzzed_inputs_give_one_clear_line(llmctl, ws, tmp_path, case):
    source, files, command, runs = CASES[case]
    rng = random.Random(f"{SEED}-{case}")
    for i in range(runs):
        x = tmp_path / f"{i}-{ws[source].name}"
        (shutil.copytree if ws[source].is_dir() else shutil.copy)(ws[source], x)
        target = x / rng.choice([f for f in files if (x / f).is_file()]) if ws[source].is_dir() else x
        corrupt(target, rng)
        before = snapshot(x)
        out = tmp_path / f"out-{i}"
        r = llmctl(*command(x, ws, out))
        what = f"{case} #{i}: {target.name} → exit {r.code}: {r.stderr.strip()[-400:]}"
        assert r.code in (0, 1, 2), what
        assert "Traceback" not in r.stderr and "re-run with --debug" not in r.stderr, what
        if r.code:
            assert r.stderr.strip().splitlines()[-1].startswith("error:"), what
            assert not out.exists(), what
        assert snapshot(x) == before, f"{what}: the input was modified"
