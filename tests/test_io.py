"""Atomic outputs: nothing partial on failure, nothing overwritten without force."""

import os

import pytest

from llmctl.core.io import atomic_dir, atomic_file, write_json
from llmctl.errors import OutputExistsError


def test_atomic_dir_success(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        assert tmp != out and tmp.parent == out.parent
        (tmp / "a.txt").write_text("hi")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "hi"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_nothing(tmp_path, exc):
    out = tmp_path / "ckpt"
    with pytest.raises(exc):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 100)
            raise exc()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_protected(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_dir(out):
            pass
    # with force, a failure still keeps the old output
    with pytest.raises(RuntimeError):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError
    assert (out / "keep.txt").read_text() == "precious"
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_atomic_file(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": 1})
    with pytest.raises(OutputExistsError):
        with atomic_file(path, "w"):
            pass
    with pytest.raises(ValueError):
        with atomic_file(path, "w", force=True) as f:
            f.write("partial")
            raise ValueError
    assert path.read_text().strip().startswith("{")
    assert sorted(os.listdir(tmp_path)) == ["x.json"]
