"""Where a command may write: the `--force` rules and the lock on an output.

    with claim_output(args.output, "tokenizer", force=options.force, inputs=corpus):
        ...                                   # work; a second writer of the same path fails at once
        with atomic_dir(args.output, force=options.force) as tmp:
            ...                               # built beside the old output, swapped in on success

`--force` replaces an output only if it is empty or an llmctl output of the same kind
(`OUTPUT_KINDS`), and never the working directory, a directory above it, or an input of the
same command. The lock is `.NAME.lock` beside the output: it holds the owner's PID and host,
and an `flock` that the kernel drops when the owner dies, so a stale lock never blocks.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from llmctl.core.registry import Registry
from llmctl.errors import LlmctlError, OutputExistsError, OutputLocked, UsageError

OUTPUT_KINDS: Registry[Callable[[Path], bool]] = Registry("output kind")


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@OUTPUT_KINDS.register("tokenizer")
def _is_tokenizer(path: Path) -> bool:
    """A tokenizer directory (not a checkpoint, which also holds a tokenizer)."""
    return (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file() \
        and not (path / "config.json").exists() and not (path / "manifest.json").exists()


@OUTPUT_KINDS.register("shards")
def _is_shards(path: Path) -> bool:
    from llmctl.core.data.shards import FORMAT, MANIFEST

    return _json(path / MANIFEST).get("format") == FORMAT


@OUTPUT_KINDS.register("train")
def _is_train_dir(path: Path) -> bool:
    from llmctl.core.train.config import CHECKPOINTS, CONFIG_FILE

    return (path / CONFIG_FILE).is_file() or (path / CHECKPOINTS).is_dir()


@OUTPUT_KINDS.register("png")
def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


@OUTPUT_KINDS.register("samples")
def _is_samples(path: Path) -> bool:
    """An `eval --log-samples` JSONL file: its first line a record naming checkpoint and task."""
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and {"checkpoint", "task"} <= first.keys()


@OUTPUT_KINDS.register("prune")
def _is_pruned(path: Path) -> bool:
    """A checkpoint written by `llmctl prune`."""
    return (path / "config.json").is_file() and _json(path / "llmctl.json").get("command") == "prune"


def _is_empty(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _paths(inputs: Iterable[str | os.PathLike | None]) -> list[Path]:
    """The inputs that exist, a glob pattern's matches included (`data/*.txt` names the files in data/),
    and what an input reads besides: an adapter directory's base, both halves of merge's `BASE+ADAPTER`."""
    found = []
    for p in inputs:
        if p in (None, "", "-"):
            continue
        if Path(p).exists():
            found += [Path(p).resolve(), *_base(Path(p))]
        elif any(c in str(p) for c in "*?["):
            found.extend(Path(match).resolve() for match in glob.glob(str(p), recursive=True))
        elif "+" in str(p):
            found.extend(_paths(str(p).partition("+")[::2]))
    return found


def _base(path: Path) -> list[Path]:
    """The base checkpoint an adapter directory is loaded on (none for anything else)."""
    from llmctl.core.adapters.files import base_path, is_adapter

    try:
        return [base_path(path).resolve()] if is_adapter(path) else []
    except LlmctlError:  # no readable base: the command that loads it says so
        return []


def check_output(path: str | os.PathLike, kind: str, *, force: bool, inputs: Iterable = ()) -> Path:
    """Raise unless `path` may be written as a `kind` output; return it as a Path.

    Without `force` an existing path is refused; with it, only an empty directory or an llmctl
    output of the same kind, never the working directory or above, never an input.
    """
    path = Path(path)
    if str(path) == "-":  # read as stdout by every other tool: never a file or directory named "-"
        raise UsageError(f"output -: a {kind} output is written to a path, not to stdout; give a path")
    where = path.resolve()
    for parent in where.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"output {path}: {parent} is a file, not a directory")
            break
    if not (path.exists() or path.is_symlink()):
        return path
    if not force:
        raise OutputExistsError(f"output {path} already exists (use --force to replace it)")
    refuse = f"--force will not replace {path}"
    cwd = Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        raise UsageError(f"{refuse}: it is the working directory{' or holds it' if where != cwd else ''}; "
                         "choose a new output path")
    for source in _paths(inputs):
        if source == where or where in source.parents:
            raise UsageError(f"{refuse}: it {'is' if source == where else 'holds'} the input {source}; "
                             "choose another output path")
    if not _is_empty(path) and not OUTPUT_KINDS.get(kind)(path):
        raise OutputExistsError(f"{refuse}: it is not an llmctl {kind} output (move it away or choose another path)")
    return path


def lock_path(path: str | os.PathLike) -> Path:
    where = Path(path).resolve()
    return where.parent / f".{where.name}.lock"


@contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold `.NAME.lock` beside `path` (its directory must exist) for the block; OutputLocked if
    a live process holds it."""
    lock = lock_path(path)
    fd = _acquire(lock, path)
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(["llmctl", *sys.argv[1:3]])}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(owner) + "\n").encode())
        yield lock
    finally:
        try:
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _acquire(lock: Path, path) -> int:
    """An open, exclusively flocked descriptor of `lock` (the file at that path, not an unlinked one)."""
    import fcntl

    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _json(lock)
            os.close(fd)
            who = f"process {owner.get('pid', '?')} on {owner.get('host', '?')}"
            raise OutputLocked(f"output {path} is being written by {who} ({lock}); wait for it to finish "
                               "or choose another output path") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:  # the previous owner removed it between our open and flock
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def claim_output(path: str | os.PathLike, kind: str, *, force: bool, inputs: Iterable = ()) -> Iterator[Path]:
    """`check_output` then `output_lock`, re-checking under the lock (a writer may have just finished)."""
    path = check_output(path, kind, force=force, inputs=inputs)
    lock_path(path).parent.mkdir(parents=True, exist_ok=True)
    with output_lock(path):
        yield check_output(path, kind, force=force, inputs=inputs)
