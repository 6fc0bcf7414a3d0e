"""Never lose a user's files: --force rules, output locks, atomic swaps, leftovers (issue 14)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _safety import FAST, make_workspace, one_line_error, snapshot


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    return make_workspace(tmp_path_factory.mktemp("ws"))


def _train(ws, *extra):
    return ["train", *FAST, f"data={ws['shards']}", "max_steps=2", *extra]


# -- --force replaces only an llmctl output of the same kind -----------------------------------


def test_force_never_replaces_the_working_directory(llmctl, ws, tmp_path, monkeypatch):
    work = tmp_path / "s"
    work.mkdir()
    (work / "notes.txt").write_text("precious")
    monkeypatch.chdir(work)
    for args in (_train(ws, "-o", "."), ["tokenize", "train", ws["text"], "--vocab-size", "300", "-o", "."],
                 ["tokenize", "encode", ws["text"], "-t", ws["tok"], "-o", "."]):
        one_line_error(llmctl(*args, "--force"), 2, "working directory")
    one_line_error(llmctl(*_train(ws, "-o", str(tmp_path)), "--force"), 2, "working directory")  # a parent of it
    assert (work / "notes.txt").read_text() == "precious" and sorted(os.listdir(work)) == ["notes.txt"]


def test_force_never_replaces_an_input(llmctl, ws, tmp_path):
    before = snapshot(ws["shards"], ws["tok"])
    one_line_error(llmctl(*_train(ws, "-o", ws["shards"]), "--force"), 2, "input")
    corpdir = tmp_path / "corpdir"
    corpdir.mkdir()
    (corpdir / "corpus.txt").write_text(ws["text"].read_text())
    one_line_error(llmctl("tokenize", "encode", corpdir, "-t", ws["tok"], "-o", corpdir, "--force"), 2, "input")
    one_line_error(llmctl("tokenize", "encode", ws["text"], "-t", ws["tok"], "-o", ws["tok"], "--force"), 2, "input")
    assert (corpdir / "corpus.txt").is_file()
    assert snapshot(ws["shards"], ws["tok"]) == before
    data = tmp_path / "data"  # an llmctl data output that holds the corpus, named by a glob
    assert llmctl("tokenize", "encode", ws["text"], "-t", ws["tok"], "-o", data).code == 0
    (data / "raw.txt").write_text(ws["text"].read_text())
    one_line_error(llmctl("tokenize", "encode", f"{data}/*.txt", "-t", ws["tok"], "-o", data, "--force"), 2, "input")
    assert (data / "raw.txt").read_text() == ws["text"].read_text()


def test_force_never_replaces_the_distill_teacher(llmctl, ws, tmp_path):
    import shutil

    teacher = tmp_path / "teacher"  # a train output, so of the kind train's --force replaces
    shutil.copytree(ws["run"], teacher)
    before = snapshot(teacher)
    args = ["distill", "--teacher", teacher, "--student", "nano", "--data", ws["shards"], *FAST[1:], "max_steps=2"]
    one_line_error(llmctl(*args, "-o", teacher, "--force"), 2, "input")
    assert snapshot(teacher) == before


def test_force_replaces_only_the_same_kind(llmctl, ws, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "data.csv").write_text("a,b\n")
    for args in (_train(ws, "-o", other), ["tokenize", "train", ws["text"], "--vocab-size", "300", "-o", other],
                 ["tokenize", "encode", ws["text"], "-t", ws["tok"], "-o", other]):
        one_line_error(llmctl(*args, "--force"), 2, "not an llmctl")
    tok_copy = tmp_path / "tok"
    assert llmctl("tokenize", "train", ws["text"], "--vocab-size", "300", "-o", tok_copy).code == 0
    one_line_error(llmctl(*_train(ws, "-o", tok_copy), "--force"), 2, "not an llmctl train output")
    assert (other / "data.csv").read_text() == "a,b\n"
    r = llmctl("tokenize", "train", ws["text"], "--vocab-size", "280", "-o", tok_copy, "--force")
    assert r.code == 0, r.stderr  # a tokenizer replaces a tokenizer
    r = llmctl("plot", ws["run"], "-o", ws["run"] / "metrics.jsonl", "--force")  # a PNG replaces only a PNG
    one_line_error(r, 2, "not an llmctl png output")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert llmctl("tokenize", "encode", ws["text"], "-t", ws["tok"], "-o", empty, "--force").code == 0


def test_train_force_keeps_the_old_run_until_the_new_one_has_a_checkpoint(llmctl, ws, tmp_path, monkeypatch):
    from llmctl.core.train import loop

    out = tmp_path / "run"
    assert llmctl(*_train(ws, "lr=0.001", "-o", out)).code == 0
    old = snapshot(out)
    seen = []
    step = loop.Trainer.train_step

    def watching(self):
        seen.append((self.step, "lr: 0.001" in (out / "train_config.yaml").read_text()))
        if self.step == 3 and os.environ.get("STOP_AT_3"):
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(loop.Trainer, "train_step", watching)
    monkeypatch.setenv("STOP_AT_3", "1")
    r = llmctl(*_train(ws, "lr=0.002", "max_steps=6", "save_every=3", "-o", out), "--force")
    assert r.code == 130
    # steps 0-2 ran while OUTDIR was still the old run; the new one replaced it at its step-3 checkpoint
    assert seen == [(0, True), (1, True), (2, True), (3, False)]
    assert "lr: 0.002" in (out / "train_config.yaml").read_text() and (out / "checkpoints/step-000003").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging dir, no lock, no old copy

    assert llmctl(*_train(ws, "lr=0.001", "-o", tmp_path / "run2")).code == 0
    old = snapshot(tmp_path / "run2")
    seen.clear()
    monkeypatch.setattr(loop.Trainer, "train_step", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    r = llmctl(*_train(ws, "lr=0.002", "-o", tmp_path / "run2"), "--force")  # Ctrl-C before any checkpoint
    assert r.code == 130
    assert snapshot(tmp_path / "run2") == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run2"]


# -- locks ------------------------------------------------------------------------------------


def test_a_second_writer_fails_at_once(llmctl, ws, tmp_path):
    from llmctl.core.outputs import lock_path, output_lock

    out = tmp_path / "run"
    with output_lock(out):
        owner = json.loads(lock_path(out).read_text())
        assert owner["pid"] == os.getpid() and owner["host"]
        one_line_error(llmctl(*_train(ws, "-o", out)), 1, "being written by process", str(os.getpid()))
        one_line_error(llmctl("tokenize", "encode", ws["text"], "-t", ws["tok"], "-o", out), 1, "being written")
        assert not out.exists()
    assert not lock_path(out).exists()
    assert llmctl(*_train(ws, "-o", out)).code == 0


def test_a_second_process_is_refused_and_a_stale_lock_is_taken_over(ws, tmp_path):
    from llmctl.core.outputs import lock_path

    out = tmp_path / "tok"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from llmctl.core.outputs import output_lock\n"
        f"with output_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = subprocess.run([sys.executable, "-m", "llmctl", "tokenize", "train", str(ws["text"]), "--vocab-size",
                            "300", "-o", str(out)], capture_output=True, text=True)
        assert r.returncode == 1 and f"process {holder.pid}" in r.stderr and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(out).exists()  # killed: its lock file stays, but no process holds it
    r = subprocess.run([sys.executable, "-m", "llmctl", "tokenize", "train", str(ws["text"]), "--vocab-size", "300",
                        "-o", str(out), "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not lock_path(out).exists()


# -- eval keeps its results when it cannot record them -----------------------------------------


def test_eval_prints_results_when_recording_fails(llmctl, ws, monkeypatch):
    import llmctl.core.checkpoint as checkpoint

    def read_only(path, record):
        raise PermissionError(13, "Permission denied", str(Path(path) / "llmctl.json"))

    monkeypatch.setattr(checkpoint, "append_metrics", read_only)
    r = llmctl("eval", ws["ckpt"], "--task", "perplexity", "--data", ws["text"], "--json")
    one_line_error(r, 1, "could not record", "--no-record")
    result = r.json()["results"][str(ws["ckpt"])]["perplexity"]
    assert result["perplexity"] > 1
    r = llmctl("eval", ws["ckpt"], "--task", "perplexity", "--data", ws["text"], "--no-record", "--json")
    assert r.code == 0 and r.json()["results"]


# -- atomic replacement under a fault -----------------------------------------------------------


def test_a_failure_between_the_two_renames_restores_the_old_output(tmp_path, monkeypatch):
    from llmctl.core import io

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = os.replace
    calls = []

    def second_fails(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", second_fails)
    with pytest.raises(OSError):
        with io.atomic_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert calls[0] == ("out", f".out.old-{os.getpid()}") and calls[1][1] == "out"
    assert (out / "old.txt").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["out"]


def test_a_crash_between_the_two_renames_is_repaired_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    crash = (
        "import os\nfrom llmctl.core import io\nreal = os.replace\ncalls = []\n"
        "def replace(a, b):\n    calls.append(1)\n    if len(calls) == 2:\n        os._exit(9)\n    real(a, b)\n"
        f"io.os.replace = replace\nwith io.atomic_dir({str(out)!r}, force=True) as tmp:\n"
        "    (tmp / 'new.txt').write_text('new')\n")
    assert subprocess.run([sys.executable, "-c", crash]).returncode == 9
    assert not out.exists() and any(p.name.startswith(".out.old-") for p in tmp_path.iterdir())
    from llmctl.core.io import atomic_dir
    from llmctl.errors import OutputExistsError

    with pytest.raises(OutputExistsError):  # the old output is back, so without --force it is kept
        with atomic_dir(out):
            pass
    assert (out / "old.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the crashed writer's temporary directory is gone too


# -- leftovers ------------------------------------------------------------------------------------


def test_resume_leaves_no_temporaries(llmctl, ws, tmp_path):
    out = tmp_path / "run"
    assert llmctl(*_train(ws, "-o", out)).code == 0
    dead = out / "checkpoints" / ".step-000009.tmp-999999999-abc"  # a writer killed mid-save
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    assert llmctl("train", "-o", out, "--resume").code == 0  # a finished run: nothing to do
    assert llmctl("train", "-o", out, "--resume", "max_steps=3").code == 0
    hidden = [p.name for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if p.name.startswith(".")]
    assert hidden == []
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_output_under_a_file_is_a_usage_error(llmctl, ws, tmp_path):
    (tmp_path / "plainfile").write_text("x")
    one_line_error(llmctl("tokenize", "train", ws["text"], "--vocab-size", "300", "-o", tmp_path / "plainfile/sub"),
                   2, "is a file")
