"""One actionable line and the right exit code for bad inputs; no silently ignored settings; no
claims that are not true; global flags on both sides of every command (issue 14)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from _safety import FAST, make_workspace, one_line_error


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    return make_workspace(tmp_path_factory.mktemp("ws"))


def _stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


# -- raw exceptions that are now messages ----------------------------------------------------------


def test_non_utf8_stdin(llmctl, ws, monkeypatch):
    for args in (("tokenize", "inspect", "-", "-t", ws["tok"]), ("generate", ws["ckpt"], "-", "-n", "2")):
        _stdin(monkeypatch, b"caf\xe9 \xff\xfe")
        one_line_error(llmctl(*args), 1, "stdin", "not UTF-8")


def test_non_utf8_jsonl_names_the_line(llmctl, ws, tmp_path):
    binary = tmp_path / "binary.bin"
    binary.write_bytes(b'{"prompt": "ok"}\n\x00\x9f\xff binary \xfe')
    one_line_error(llmctl("generate", ws["ckpt"], "--input", binary), 1, f"{binary}:2", "not UTF-8")


def _with_model_vocab(ws, tmp_path, vocab_size: int) -> Path:
    from llmctl.core.model import ModelConfig, Transformer
    from llmctl.core.model.io import save_model

    ckpt = tmp_path / f"vocab{vocab_size}"
    model = Transformer(ModelConfig(vocab_size=vocab_size, hidden_size=32, num_layers=1, num_heads=2, max_seq_len=64))
    save_model(model, ckpt, tokenizer_dir=ws["tok"])
    return ckpt


def test_tokenizer_larger_than_the_model(llmctl, ws, tmp_path):
    small = _with_model_vocab(ws, tmp_path, 100)
    one_line_error(llmctl("generate", small, "hello", "-n", "2"), 1, "300 tokens", "vocab_size is 100")
    one_line_error(llmctl("eval", small, "--task", "perplexity", "--data", ws["text"], "--no-record"), 1, "vocab_size")
    one_line_error(llmctl("train", *FAST, f"model={small}", f"data={ws['shards']}", "max_steps=1", "-o",
                          tmp_path / "out"), 2, "vocab_size 100")
    assert not (tmp_path / "out").exists()


def test_shards_with_out_of_vocabulary_ids_fail_before_step_one(llmctl, ws, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(ws["shards"], shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    file = shards / manifest["splits"]["train"]["shards"][0]["file"]
    ids = np.fromfile(file, dtype=manifest["dtype"])
    ids[len(ids) // 2] = 4000
    ids.tofile(file)
    out = tmp_path / "out"
    one_line_error(llmctl("train", *FAST, f"data={shards}", "max_steps=2", "-o", out), 2, "token id 4,000", "re-encode")
    assert not out.exists()  # nothing blocks a plain re-run


def test_resume_with_another_architecture(llmctl, ws, tmp_path):
    out = tmp_path / "run"
    assert llmctl("train", *FAST, f"data={ws['shards']}", "max_steps=2", "-o", out).code == 0
    recipe = (out / "train_config.yaml").read_text()
    r = llmctl("train", "-o", out, "--resume", "max_steps=3", "model_args.num_layers=3")
    one_line_error(r, 1, "another architecture", "new OUTDIR")
    assert (out / "train_config.yaml").read_text() == recipe  # the run's own recipe still resumes it
    assert llmctl("train", "-o", out, "--resume", "max_steps=3").code == 0


def test_small_usage_mistakes(llmctl, ws, tmp_path, monkeypatch):
    one_line_error(llmctl("plot", ws["run"], "--width", "0"), 2, "--width")
    one_line_error(llmctl("train", "-o", tmp_path / "missing", "--resume"), 2, "holds no training run")
    monkeypatch.chdir(tmp_path)
    one_line_error(llmctl("tokenize", "train", ws["text"], "--vocab-size", "300", "-o", ".", "--force"), 2,
                   "working directory")
    (tmp_path / "plainfile").write_text("")
    one_line_error(llmctl("tokenize", "encode", ws["text"], "-t", ws["tok"], "-o", "plainfile/sub"), 2, "is a file")


def test_broken_pipe_exits_quietly(llmctl, ws, monkeypatch):
    class ClosedPipe(io.StringIO):  # stdout after `| head -1` has exited
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise io.UnsupportedOperation("fileno")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    r = llmctl("tokenize", "inspect", "hello world", "-t", ws["tok"], "--json")
    assert r.code == 141 and r.stderr == "", r.stderr


def test_non_finite_weights(llmctl, ws, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "nan"
    shutil.copytree(ws["ckpt"], ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    name = sorted(tensors)[-1]
    tensors[name][0] = float("nan")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    one_line_error(llmctl("generate", ckpt, "hello", "-n", "2"), 1, "non-finite weights")
    one_line_error(llmctl("eval", ckpt, "--task", "perplexity", "--data", ws["text"], "--no-record"), 1,
                   "non-finite weights")


# -- settings that were silently ignored -----------------------------------------------------------


def test_ignored_settings_warn_or_refuse(llmctl, ws, tmp_path):
    r = llmctl("train", *FAST, f"data={ws['shards']}", "max_steps=2", "warmup_steps=10", "-o", tmp_path / "a")
    assert r.code == 0 and "warmup_steps=10 is longer than max_steps=2" in r.stderr
    one_line_error(llmctl("train", *FAST, f"data={ws['shards']}", "model_args.vocab_size=100", "-o", tmp_path / "b"),
                   2, "model_args.vocab_size")
    r = llmctl("train", *FAST, f"data={ws['shards']}", "model_args.vocab_size=320", "max_steps=1", "-o", tmp_path / "c")
    assert r.code == 0 and json.loads((tmp_path / "c" / "config.json").read_text())["vocab_size"] == 320
    one_line_error(llmctl("train", "-o", tmp_path / "a", "--resume", "max_steps=1"), 2, "below step 2")
    r = llmctl("tokenize", "train", ws["text"], "--vocab-size", "100000", "-o", tmp_path / "tok")
    assert r.code == 0 and "the vocabulary reached" in r.stderr
    one_line_error(llmctl("eval", ws["ckpt"], "--task", "perplexity", "--data", ws["text"], "--max-length", "0"), 2,
                   "--max-length")
    one_line_error(llmctl("generate", ws["ckpt"], "hi", "--stop", ""), 2, "--stop")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi", "max_new_tokens": 50}) + "\n")
    r = llmctl("generate", ws["ckpt"], "--input", prompts, "-n", "2")
    assert r.code == 0 and "max_new_tokens ignored" in r.stderr
    assert len(json.loads(r.stdout.splitlines()[0])["tokens"]) <= 2


# -- claims that were not true ---------------------------------------------------------------------


def test_help_lists_installed_commands_and_the_plot_extra(llmctl_proc):
    r = llmctl_proc("--help")
    from importlib.metadata import entry_points

    installed = {ep.name for ep in entry_points(group="llmctl.commands")}
    assert r.code == 0 and {"train", "finetune", "prune", "quantize", "export", "merge", "distill"} <= installed
    assert all(name in r.stdout for name in installed)
    assert "llmctl[plot]" in llmctl_proc("plot", "--help").stdout


def test_train_writes_generation_config(ws):
    gen = json.loads((ws["run"] / "generation_config.json").read_text())
    config = json.loads((ws["run"] / "config.json").read_text())
    assert gen["eos_token_id"] == config["eos_token_id"] is not None


# -- global options on both sides ------------------------------------------------------------------


def test_global_flags_before_and_after_every_command(llmctl, ws, tmp_path):
    assert llmctl("tokenize", "inspect", "hello", "-t", ws["tok"], "--debug").code == 0
    tok = tmp_path / "tok"
    assert llmctl("tokenize", "train", ws["text"], "--vocab-size", "300", "-o", tok).code == 0
    assert llmctl("--force", "tokenize", "train", ws["text"], "--vocab-size", "280", "-o", tok).code == 0
    assert llmctl("tokenize", "train", ws["text"], "--vocab-size", "280", "-o", tok, "--force").code == 0
    r = llmctl("tokenize", "decode", "-t", ws["tok"], "99999", "--debug")
    assert r.code == 2 and "Traceback" in r.stderr  # --debug after a subcommand shows the traceback
