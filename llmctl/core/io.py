"""Atomic outputs: write to a temporary sibling, fsync, rename; never clobber without force."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from llmctl.errors import OutputExistsError


def check_output(path: str | os.PathLike, force: bool = False) -> Path:
    """Raise `OutputExistsError` if `path` exists and `force` is off; return it as a Path."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"output {path} already exists (use --force to overwrite)")
    return path


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace(tmp: Path, path: Path) -> None:
    """Move `tmp` onto `path`, removing an old `path` only once `tmp` is complete."""
    if path.exists() or path.is_symlink():
        trash = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, trash)
        os.replace(tmp, path)
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `path` only if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary directory is removed
    and an existing `path` is left untouched.
    """
    path = check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", force: bool = False, **open_kwargs) -> Iterator:
    """Open a temporary sibling of `path` for writing; it replaces `path` on success."""
    path = check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data, force: bool = True) -> None:
    """Atomically write `data` as indented JSON (overwrites by default: used inside outputs)."""
    import json

    with atomic_file(path, "w", force=force, encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
