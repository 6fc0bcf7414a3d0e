"""Atomic writes' edges (`core/io.py`): what recovery leaves to live writers, removals that
cannot fail a finished write, the exact JSON written, and names that must stay inside a folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import llmctl.core.io as io
from llmctl.core.io import check_output, inside, recover, replace_dir, write_json
from llmctl.errors import CheckpointError, OutputExistsError


def test_check_output_refuses_an_existing_path_by_default(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match=r"^output .*out already exists \(use --force to overwrite\)$"):
        check_output(tmp_path / "out")
    assert check_output(tmp_path / "out", force=True) == tmp_path / "out"


def test_recovery_leaves_live_writers_alone(tmp_path):
    """Leftovers of this process and of a running one stay; a dead writer's go."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "out").mkdir()
        ours = tmp_path / f".out.old-{os.getpid()}"
        running = tmp_path / f".out.tmp-{sleeper.pid}-k2j8x"
        dead = tmp_path / ".out.tmp-999999999-abc"
        for p in (ours, running, dead):
            p.mkdir()
        recover(tmp_path / "out")
        assert ours.is_dir() and running.is_dir() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_process_we_may_not_signal_is_alive(monkeypatch):
    assert io._alive(os.getpid())

    def refused(pid, sig):
        raise PermissionError

    monkeypatch.setattr(io.os, "kill", refused)
    assert io._alive(1)


def test_removing_what_is_already_gone_is_not_an_error(tmp_path):
    io._remove(tmp_path / "gone")
    io._remove(tmp_path / "gone-dir")


def test_a_finished_swap_survives_an_old_copy_that_cannot_be_removed(tmp_path, monkeypatch):
    out, new = tmp_path / "out", tmp_path / "new"
    for d, text in ((out, "old"), (new, "new")):
        d.mkdir()
        (d / "f.txt").write_text(text)

    def refused(*args, **kw):
        raise PermissionError("read-only")

    monkeypatch.setattr(io.os, "rmdir", refused)
    replace_dir(new, out)
    assert (out / "f.txt").read_text() == "new"


def test_write_json_is_indented_utf8_with_a_final_newline(tmp_path):
    write_json(tmp_path / "x.json", {"a": [1], "name": "ü"})
    assert (tmp_path / "x.json").read_bytes() == '{\n  "a": [\n    1\n  ],\n  "name": "ü"\n}\n'.encode()


def test_write_json_is_utf8_under_an_ascii_locale(tmp_path):
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    code = ("import sys\nfrom llmctl.core.io import write_json\n"
            "write_json(sys.argv[1], {'name': '\\u00fc'})")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.json")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "x.json").read_bytes() == '{\n  "name": "ü"\n}\n'.encode()


@pytest.mark.parametrize("name, message", [
    ("", "lineage.json: '' is not a file name"),
    (5, "lineage.json: 5 is not a file name"),
    (None, "lineage.json: None is not a file name"),
])
def test_inside_refuses_what_is_not_a_file_name(tmp_path, name, message):
    with pytest.raises(CheckpointError) as caught:
        inside(tmp_path, name, "lineage.json")
    assert str(caught.value) == message
    with pytest.raises(ValueError, match="points outside"):
        inside(tmp_path, "../x", "lineage.json", ValueError)


def test_recovery_restores_the_newest_hidden_output_only_where_nothing_is(tmp_path):
    out = tmp_path / "out"
    copies = {pid: tmp_path / f".out.old-{pid}" for pid in (999999991, 999999997, 999999993)}
    for age, (pid, copy) in enumerate(copies.items()):
        copy.mkdir()
        (copy / "pid").write_text(str(pid))
        os.utime(copy, (1_000_000 + age * 10,) * 2)  # 999999993's copy is the newest
    recover(out)
    assert (out / "pid").read_text() == "999999993" and sorted(os.listdir(tmp_path)) == ["out"]

    (tmp_path / ".out.old-999999995").mkdir()  # a dead writer's copy beside an output that exists
    recover(out)
    assert (out / "pid").read_text() == "999999993" and sorted(os.listdir(tmp_path)) == ["out"]


# -- the temporary siblings of atomic_dir and atomic_file (round 10) ------------------------------


def test_atomic_outputs_build_as_hidden_siblings_and_make_missing_parents(tmp_path):
    """The temporary directory or file is `.NAME.tmp-PID-…` beside the output (a rename, not a copy
    across filesystems, and what `_remove_leftovers` finds), inside parents made as needed."""
    target = tmp_path / "a" / "b" / "out"
    with io.atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(f".out.tmp-{os.getpid()}-")
        (tmp / "x").write_text("1")
    assert (target / "x").read_text() == "1"
    target = tmp_path / "c" / "d" / "f.txt"
    with io.atomic_file(target) as f:  # text mode by default
        assert os.path.dirname(f.name) == str(target.parent)
        assert os.path.basename(f.name).startswith(f".f.txt.tmp-{os.getpid()}-")
        f.write("hé")
    assert target.read_text(encoding="utf-8") == "hé"
    with io.atomic_file(tmp_path / "u16.txt", "w", encoding="utf-16") as f:  # open's arguments reach open
        f.write("hé")
    assert (tmp_path / "u16.txt").read_bytes() == "hé".encode("utf-16")


def test_the_blocks_own_error_comes_back_even_if_the_temporary_is_gone(tmp_path):
    import shutil

    with pytest.raises(ValueError, match="mine"):
        with io.atomic_dir(tmp_path / "out") as tmp:
            shutil.rmtree(tmp)
            raise ValueError("mine")
    with pytest.raises(ValueError, match="mine"):
        with io.atomic_file(tmp_path / "f.txt") as f:
            os.unlink(f.name)
            raise ValueError("mine")
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_outputs_take_the_umasks_modes_not_the_temporarys(tmp_path, mask, file_mode, dir_mode):
    """mkstemp/mkdtemp create 0600/0700: a GGUF, adapter or merged model must still be readable by others
    under the usual umask, and stay private under a strict one."""
    import stat

    old = os.umask(mask)
    try:
        with io.atomic_file(tmp_path / "model.gguf", "wb") as f:
            f.write(b"GGUF")
        with io.atomic_dir(tmp_path / "merged") as d:
            (d / "config.json").write_text("{}")
        assert os.umask(mask) == mask  # reading the umask set it straight back
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model.gguf").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "merged" / "config.json").stat().st_mode) == file_mode


def test_a_file_rewritten_in_place_keeps_its_mode(tmp_path):
    """`tokenize set-template` or eval's recording rewrite files the user had: their modes stay."""
    import stat

    path = tmp_path / "tokenizer_config.json"
    path.write_text("{}")
    path.chmod(0o640)
    write_json(path, {"chat_template": "x"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and "chat_template" in path.read_text()
