"""Run untrusted Python programs (generated code, its unit tests) in a limited subprocess.

    result = run_python(source, Limits(timeout=5))
    result.passed        # exit status 0 within the limits

Each program runs in a fresh `python -I` subprocess, in its own session (process group), in a
temporary working directory that is removed afterwards, with an empty environment and:
- time: killed (the whole process group, SIGKILL) after `timeout` seconds of wall time,
  and an RLIMIT_CPU of the same length;
- memory: RLIMIT_AS (address space) of `memory_mb`;
- files: RLIMIT_FSIZE (largest file it may write) of `file_mb`, no core dumps;
- processes: a seccomp filter (x86-64, aarch64) makes fork, vfork and non-thread clone fail,
  so a program cannot start processes (threads work); RLIMIT_NPROC `max_processes` as well
  (the kernel does not apply it to root); `processes_blocked()` says whether the filter holds;
- network: a new, empty network namespace (unshare of a user + network namespace), where
  the kernel allows unprivileged user namespaces; `network_isolated()` says whether it does.

This is a safety boundary against *mistakes* (infinite loops, memory or fork bombs, stray
file writes, accidental network calls), not a security boundary against hostile code. Its
limits, plainly: the program runs as your user and can read, and outside its working
directory write, every file your user can; other system calls are not filtered; on other
architectures, or where seccomp is refused, there is no filter and a root user has no process limit; without user
namespaces the network is reachable (`network_isolated()` is False, and `run_many` warns on its
report). Run hostile code in a container or VM. The module is shared by eval's pass@k and unit-test rewards.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from llmctl.core.report import SILENT, Reporter
from llmctl.errors import LlmctlError

OUTPUT_LIMIT = 1 << 16  # characters of stdout/stderr kept per program
_live: set[subprocess.Popen] = set()  # programs running now (killed by run_many on an interrupt)


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # seconds of wall time before the process group is killed
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    file_mb: int = 16  # largest file the program may write (RLIMIT_FSIZE)
    max_processes: int = 512  # RLIMIT_NPROC (per user: counts the user's other processes too)
    network: bool = False  # True: leave the network namespace alone


@dataclass(frozen=True)
class Result:
    status: str  # "passed" (exit 0), "failed" (non-zero exit or a signal), "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The child applies its limits itself, then execs the program: a fresh single-threaded
# interpreter may unshare namespaces, and nothing runs between fork and exec in the caller
# (whose threads could hold locks there).
_BOOTSTRAP = """
import ctypes, os, platform, resource, struct, sys
timeout, memory_mb, file_mb, nproc, isolate, program = sys.argv[1:]
mb = 1 << 20
for which, value in ((resource.RLIMIT_CPU, int(float(timeout)) + 1), (resource.RLIMIT_AS, int(memory_mb) * mb),
                     (resource.RLIMIT_FSIZE, int(file_mb) * mb), (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_NPROC, int(nproc))):
    hard = resource.getrlimit(which)[1]
    resource.setrlimit(which, (value if hard == resource.RLIM_INFINITY else min(value, hard), hard))
libc = ctypes.CDLL(None, use_errno=True)
if isolate == "1" and libc.unshare(0x10000000 | 0x40000000) != 0:  # CLONE_NEWUSER | CLONE_NEWNET
    sys.stderr.write("llmctl-sandbox: unshare: " + os.strerror(ctypes.get_errno()) + "\\n")
    sys.exit(97)  # after the limits: a new user namespace inherits RLIMIT_NPROC as its ceiling
# seccomp: fork, vfork and clone without CLONE_THREAD fail with EPERM, clone3 with ENOSYS (so
# that threads fall back to clone); root ignores RLIMIT_NPROC, this stops fork bombs for all
arch = {"x86_64": (0xC000003E, {57: 1, 58: 1, 56: 0, 435: 38}), "aarch64": (0xC00000B7, {220: 0, 435: 38})}
if platform.machine() in arch:
    audit, calls = arch[platform.machine()]
    ALLOW, ERRNO, LD, JEQ, JSET, RET = 0x7FFF0000, 0x50000, 0x20, 0x15, 0x45, 0x06
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, audit), (RET, 0, 0, ALLOW), (LD, 0, 0, 0)]
    for nr, errno in calls.items():
        if errno == 0:  # clone: allowed with CLONE_THREAD (0x10000) in its flags
            prog += [(JEQ, 0, 4, nr), (LD, 0, 0, 16), (JSET, 0, 1, 0x10000), (RET, 0, 0, ALLOW),
                     (RET, 0, 0, ERRNO | 1)]
        else:
            prog += [(JEQ, 0, 1, nr), (RET, 0, 0, ERRNO | errno)]
    prog.append((RET, 0, 0, ALLOW))
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in prog))
    fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(code))
    if libc.prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS, then PR_SET_SECCOMP (SECCOMP_MODE_FILTER)
        libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0)  # refused (old kernel, a container's policy): RLIMIT_NPROC only
os.execv(sys.executable, [sys.executable, "-I", "-B", program])
"""


@functools.lru_cache(maxsize=1)
def processes_blocked() -> bool:
    """Whether the seccomp filter stops programs from starting processes here."""
    return run_python("import os\nos.fork()\n", Limits(timeout=10, network=True)).status == "failed"


_UNSHARE_FAILED = "llmctl-sandbox: unshare: "  # the bootstrap's stderr when it cannot isolate the network
PROBE_TIMEOUT = 30.0  # seconds before one try of the network probe counts as a refusal
NOT_ISOLATED = ("programs run with network access: this system refuses them an unprivileged network namespace "
                "(see llmctl.core.sandbox)")


@functools.lru_cache(maxsize=1)
def network_isolated() -> bool:
    """Whether programs get an empty network namespace here (checked once, in a child; a second
    try before answering no, so that one failure under load does not switch isolation off)."""
    for _ in range(2):
        try:
            done = subprocess.run([sys.executable, "-I", "-c", _BOOTSTRAP, "10", "1024", "1", "512", "1",
                                   os.devnull], capture_output=True, timeout=PROBE_TIMEOUT)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return True
    return False


def run_python(source: str, limits: Limits = Limits()) -> Result:
    """Run `source` as a Python program under `limits` (see the module docstring).

    Raises `LlmctlError` when the network namespace that `network_isolated()` promised cannot
    be made twice in a row: the program never ran, and "failed" would be a wrong verdict."""
    isolate = not limits.network and network_isolated()
    for _ in range(2):
        result = _run(source, limits, isolate)
        if not (isolate and result.returncode == 97 and result.stderr.startswith(_UNSHARE_FAILED)):
            return result
    reason = result.stderr.removeprefix(_UNSHARE_FAILED).strip()
    raise LlmctlError(f"the sandbox could not give a program its own network namespace (unshare: {reason})")


def _run(source: str, limits: Limits, isolate: bool) -> Result:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmctl-sandbox-") as work:
        program = os.path.join(work, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "PYTHONDONTWRITEBYTECODE": "1",
               "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
        args = [str(limits.timeout), str(limits.memory_mb), str(limits.file_mb), str(limits.max_processes),
                "1" if isolate else "0", program]
        proc = subprocess.Popen([sys.executable, "-I", "-c", _BOOTSTRAP, *args], cwd=work, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        _live.add(proc)
        try:
            out, err = proc.communicate(timeout=limits.timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
            out, err = _kill(proc)
        finally:
            _killpg(proc.pid)  # leftovers of the group (background children), or all of it on Ctrl-C
            _live.discard(proc)
    text = functools.partial(bytes.decode, encoding="utf-8", errors="replace")
    return Result(status, proc.returncode, text(out)[:OUTPUT_LIMIT], text(err)[:OUTPUT_LIMIT],
                  time.perf_counter() - start)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(proc: subprocess.Popen) -> tuple[bytes, bytes]:
    _killpg(proc.pid)
    try:
        return proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # a grandchild outside the group holds the pipes
        proc.kill()
        proc.wait()
        return b"", b""


def run_many(sources: Sequence[str], limits: Limits = Limits(), workers: int | None = None,
             report: Reporter = SILENT) -> list[Result]:
    """`run_python` over many programs, `workers` at a time (default: the CPU count); warns on
    `report` when they will reach the network though `limits` asked for isolation."""
    if not limits.network and not network_isolated():
        report.warn(NOT_ISOLATED)
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            return list(pool.map(lambda s: run_python(s, limits), sources))
        except BaseException:  # Ctrl-C: end the running programs now, not at their timeouts
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in list(_live):
                _killpg(proc.pid)
            raise
