"""Atomic outputs: write to a temporary sibling, fsync, rename; never clobber without force.

Replacing an existing output takes two renames (old → `.NAME.old-PID`, new → NAME). A failure
between them renames the old one back; a crash between them is repaired by the next writer of
NAME (`recover`), which also removes the leftovers of dead writers.
"""

from __future__ import annotations

import glob
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
    recover(path)
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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(path: Path, tag: str) -> list[tuple[Path, int]]:
    """(`.NAME.TAG-PID*` sibling, PID) of writers that are no longer running."""
    found = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.{tag}-*"):
        pid = p.name[len(path.name) + len(tag) + 3:].split(".")[0].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            found.append((p, int(pid)))
    return found


def recover(path: str | os.PathLike) -> None:
    """Repair what a writer killed mid-swap left: put a hidden old output back if `path` is
    missing, and remove its temporary and old copies. Only dead writers' leftovers are touched."""
    path = Path(path)
    if not path.name or not path.parent.is_dir():
        return
    old = sorted(_leftovers(path, "old"), key=lambda item: item[0].stat().st_mtime)
    if old and not (path.exists() or path.is_symlink()):
        os.replace(old.pop()[0], path)
        _fsync_dir(path.parent)
    for leftover, _ in old + _leftovers(path, "tmp"):
        _remove(leftover)


def _replace(tmp: Path, path: Path) -> None:
    """Move `tmp` onto `path`, removing an old `path` only once `tmp` is in its place."""
    if path.exists() or path.is_symlink():
        trash = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, trash)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(trash, path)  # the old output goes back
            raise
        _fsync_dir(path.parent)
        _remove(trash)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def replace_dir(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Swap a complete directory `new` in at `path` (the old `path` is removed afterwards)."""
    _replace(Path(new), Path(path))


def inside(directory: str | os.PathLike, name: str, what: str, error: type[Exception] | None = None) -> Path:
    """`directory / name`, which must stay inside `directory` (no `..`, absolute paths or links
    out); else `error` (CheckpointError by default) naming `what`, the file that gave `name`."""
    from llmctl.errors import CheckpointError

    error = error or CheckpointError
    base = Path(directory).resolve()
    if not isinstance(name, str) or not name:
        raise error(f"{what}: {name!r} is not a file name")
    target = (base / name).resolve()
    if target == base or base not in target.parents:
        raise error(f"{what}: {name!r} points outside {directory}; refusing to read it")
    return Path(directory) / name


def _umask() -> int:
    """The process's umask (read by setting it, so set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `path` only if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary directory is removed
    and an existing `path` is left untouched.
    """
    path = check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would make every output private
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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp's 0600 would make every output private; a file rewritten in place keeps its mode
        tmp.chmod(path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_umask())
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
