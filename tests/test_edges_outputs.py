"""Where a command may write (`core/outputs.py`), checked in this process: the exact refusals a
user reads, the owner a lock names, the lock file's mode, and the kinds `--force` recognises.
The command-level behaviour (nothing lost, exit codes) is in `test_safety_data_loss.py`."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from llmctl.core.outputs import OUTPUT_KINDS, check_output, claim_output, lock_path, output_lock
from llmctl.errors import OutputExistsError, OutputLocked, UsageError


def _refused(error, path, kind="train", **kw) -> str:
    with pytest.raises(error) as caught:
        check_output(path, kind, **kw)
    return str(caught.value)


def test_refusals_say_what_the_output_is(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "inputs").mkdir(parents=True)
    corpus = work / "inputs" / "corpus.txt"
    corpus.write_text("text")
    foreign = work / "mine"
    foreign.mkdir()
    (foreign / "data.csv").write_text("a,b\n")
    monkeypatch.chdir(work)
    new = "fresh/out"
    assert check_output(new, "train", force=False) == Path(new)

    assert _refused(OutputExistsError, "mine", force=False) == \
        "output mine already exists (use --force to replace it)"
    refuse = "--force will not replace"
    assert _refused(UsageError, ".", force=True) == \
        f"{refuse} .: it is the working directory; choose a new output path"
    assert _refused(UsageError, "..", force=True) == \
        f"{refuse} ..: it is the working directory or holds it; choose a new output path"
    assert _refused(UsageError, corpus, force=True, inputs=[corpus]) == \
        f"{refuse} {corpus}: it is the input {corpus}; choose another output path"
    assert _refused(UsageError, "inputs", force=True, inputs=["-", "", None, corpus]) == \
        f"{refuse} inputs: it holds the input {corpus}; choose another output path"
    assert _refused(OutputExistsError, "mine", force=True) == \
        f"{refuse} mine: it is not an llmctl train output (move it away or choose another path)"
    assert _refused(UsageError, "mine/data.csv/x", force=False) == \
        f"output mine/data.csv/x: {foreign / 'data.csv'} is a file, not a directory"


def test_force_takes_an_empty_directory_or_the_same_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert check_output("empty", "train", force=True).name == "empty"
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("[1, 2]")  # JSON, but not a manifest: not ours
    assert "not an llmctl shards output" in _refused(OutputExistsError, "shards", "shards", force=True)
    (shards / "manifest.json").write_bytes(b"\xff\xfe not text")
    assert "not an llmctl shards output" in _refused(OutputExistsError, "shards", "shards", force=True)


def test_an_adapter_input_also_names_its_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    (base / "config.json").write_text("{}")
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    refuse = "--force will not replace base: it is the input"
    assert _refused(UsageError, "base", force=True, inputs=[adapter]).startswith(refuse)  # read through the adapter
    assert _refused(UsageError, "base", force=True, inputs=["base+adapter"]).startswith(refuse)  # merge's spelling
    assert _refused(UsageError, "adapter", force=True, inputs=[f"{base}+adapter"]).startswith(
        "--force will not replace adapter: it is the input")


def test_dash_is_never_an_output_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "-" means stdout: no file or directory of that name is made
    for kind in ("tokenizer", "png", "train"):
        assert _refused(UsageError, "-", kind, force=False) == \
            f"output -: a {kind} output is written to a path, not to stdout; give a path"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("first, ours", [
    ({"checkpoint": "ckpt", "task": "arc"}, True),
    ({"checkpoint": "ckpt"}, False),
    (["checkpoint", "task"], False),
])
def test_samples_are_recognised_by_their_first_record(tmp_path, first, ours):
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(first) + "\n" + json.dumps({"other": 1}) + "\n")
    assert OUTPUT_KINDS.get("samples")(path) is ours


def test_a_held_lock_names_its_owner(tmp_path):
    out = tmp_path / "run"
    with output_lock(out) as lock:
        assert lock == lock_path(out) == tmp_path / ".run.lock"
        with pytest.raises(OutputLocked) as caught, claim_output(out, "train", force=False):
            pass
    assert str(caught.value) == (f"output {out} is being written by process {os.getpid()} on {socket.gethostname()} "
                                 f"({lock}); wait for it to finish or choose another output path")
    assert not lock.exists()


def test_a_lock_without_an_owner_record_is_still_refused(tmp_path):
    out = tmp_path / "run"
    lock = lock_path(out)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(OutputLocked, match=r"by process \? on \? "):
            with output_lock(out):
                pass
    finally:
        os.close(fd)


def test_the_lock_file_is_readable_by_others_and_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["llmctl", "train", "recipe.yaml", "max_steps=1"])
    old = os.umask(0o022)
    try:
        with output_lock(tmp_path / "run") as lock:
            assert stat.S_IMODE(lock.stat().st_mode) == 0o644
            assert json.loads(lock.read_text())["command"] == "llmctl train recipe.yaml"
    finally:
        os.umask(old)


def test_a_lock_file_removed_before_it_is_locked_is_opened_again(tmp_path, monkeypatch):
    """The previous owner may unlink the lock between our open and flock: take a fresh one."""
    import llmctl.core.outputs as outputs

    real_open, real_stat, opened, vanished = os.open, os.stat, [], []

    def counting_open(path, *args):
        opened.append(path)
        return real_open(path, *args)

    def stat_once_gone(path, *args, **kw):
        if not vanished and str(path).endswith(".run.lock"):
            vanished.append(path)
            raise FileNotFoundError(path)
        return real_stat(path, *args, **kw)

    monkeypatch.setattr(outputs.os, "open", counting_open)
    monkeypatch.setattr(outputs.os, "stat", stat_once_gone)
    with output_lock(tmp_path / "run") as lock:
        assert vanished and [p for p in opened if p == lock] == [lock, lock]
        assert json.loads(lock.read_text())["pid"] == os.getpid()


# -- claim_output and the lock file (round 10) ----------------------------------------------------


def test_claim_checks_before_and_again_under_the_lock_with_the_same_arguments(tmp_path, monkeypatch):
    import llmctl.core.outputs as outputs

    calls = []
    real = outputs.check_output

    def spy(path, kind, *, force, inputs=()):
        calls.append((Path(path), kind, force, list(inputs)))
        return real(path, kind, force=force, inputs=inputs)

    monkeypatch.setattr(outputs, "check_output", spy)
    out = tmp_path / "new" / "deeper" / "run"  # the lock's directory is made as needed
    with claim_output(out, "train", force=True, inputs=[tmp_path / "data"]) as claimed:
        assert claimed == out and lock_path(out).exists()
    assert calls == [(out, "train", True, [tmp_path / "data"])] * 2
    assert not lock_path(out).exists()


def test_claim_refuses_what_check_output_refuses(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="already exists"), claim_output(data, "train", force=False):
        pass
    with pytest.raises(UsageError, match="it is the input"), claim_output(data, "train", force=True, inputs=[data]):
        pass
    with pytest.raises(OutputExistsError, match="not an llmctl train output"), \
            claim_output(data, "train", force=True, inputs=[tmp_path / "other"]):
        pass
    assert (data / "x.txt").read_text() == "x" and not lock_path(data).exists()


def test_the_lock_records_its_owner_over_a_stale_longer_record_and_may_vanish(tmp_path):
    out = tmp_path / "out"
    lock = lock_path(out)
    lock.write_text(json.dumps({"pid": 1, "host": "x" * 500, "command": "old"}) + "\n")  # a dead owner's
    with output_lock(out):
        owner = json.loads(lock.read_text())
        assert lock.read_text().count("\n") == 1 and owner["pid"] == os.getpid()
        assert owner["host"] == socket.gethostname()
        lock.unlink()  # removed by hand meanwhile: leaving the block is still fine
    assert not lock.exists()
