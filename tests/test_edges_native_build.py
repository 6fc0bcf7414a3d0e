"""Round 10 edges: where and when the native kernels are built (`core/native/__init__.py`),
without building them: the cache key, the cache directory, the CPU check, the build lock."""

from __future__ import annotations

import fcntl
import re
from pathlib import Path

import pytest
import torch

from llmctl.core import native


def test_activation_blocks_fill_64_bytes_of_weights():
    assert (native.block_of(8), native.block_of(4)) == (64, 128) and type(native.block_of(4)) is int


def test_cache_dir_follows_xdg_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_dir() == tmp_path / "xdg" / "llmctl" / "native"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert native.cache_dir() == tmp_path / "home" / ".cache" / "llmctl" / "native"


def test_the_build_key_covers_the_sources_torch_python_and_the_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    key = native.build_dir("flags: avx512f").name
    assert len(key) == 16 and native.build_dir("flags: avx512f") == tmp_path / "llmctl" / "native" / key
    assert native.build_dir("flags: avx512f avx512_bf16").name != key  # another CPU
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert native.build_dir("flags: avx512f").name != key  # another torch
    monkeypatch.undo()
    monkeypatch.setattr(native, "CFLAGS", [*native.CFLAGS, "-g"])
    assert native.build_dir("flags: avx512f").name != key  # other compiler flags
    monkeypatch.undo()
    monkeypatch.setattr(native, "PYTHON_ABI", ".cpython-399-x86_64-linux-gnu.so")
    assert native.build_dir("flags: avx512f").name != key  # another Python: torch's libraries differ
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    header = tmp_path / "kernels.h"
    header.write_bytes((native.HERE / "kernels.h").read_bytes() + b"// changed\n")
    monkeypatch.setattr(native, "HERE", tmp_path)
    assert native.build_dir("flags: avx512f").name != key  # the shared header is part of the key
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags: avx512f")
    assert native.build_dir() == native.build_dir("flags: avx512f")  # this CPU's flags by default


def test_cpu_flags_come_from_cpuinfo_or_the_platform(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags\t\t: fpu avx512f\nbugs : none\nflags : second\n")
    real = Path

    def fake(p):
        return info if str(p) == "/proc/cpuinfo" else real(p)

    monkeypatch.setattr(native, "Path", fake)
    assert native._cpu_flags() == "flags\t\t: fpu avx512f"  # the first flags line
    info.write_text("processor : 0\n")
    assert native._cpu_flags() == ""
    info.unlink()
    monkeypatch.setattr(native.platform, "processor", lambda: "arm64")
    assert native._cpu_flags() == "arm64"  # no /proc: what the platform says


@pytest.mark.parametrize("env, machine, flags", [
    ("0", "x86_64", "flags : avx2 fma avx512f"), ("1", "aarch64", "flags : avx2 fma"),
    ("1", "x86_64", "flags : avx2 avx512f"), ("1", "x86_64", "flags : avx2x fma"), ("1", "x86_64", "flags : fma2 avx2"),
    ("1", "x86_64", "")])
def test_no_kernels_where_disabled_or_without_avx2_and_fma(monkeypatch, env, machine, flags):
    monkeypatch.setenv("LLMCTL_NATIVE", env)
    monkeypatch.setattr(native.platform, "machine", lambda: machine)
    monkeypatch.setattr(native, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(native, "_loaded", lambda torch: pytest.fail("looked for built kernels"))
    native.ops.cache_clear()
    try:
        assert native.ops() is None and native.has(native.F32) is False
    finally:
        native.ops.cache_clear()


def test_kernels_already_loaded_in_the_process_are_reused(monkeypatch):
    monkeypatch.setenv("LLMCTL_NATIVE", "1")
    monkeypatch.setattr(native.platform, "machine", lambda: "AMD64")
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags : fma avx2")
    monkeypatch.setattr(native, "_loaded", lambda module: module is torch)
    monkeypatch.setattr(native, "build_dir", lambda flags=None: pytest.fail("built again"))
    native.ops.cache_clear()
    try:
        assert native.ops() is torch.ops.llmctl
    finally:
        native.ops.cache_clear()


def test_a_built_library_loads_without_asking_ninja(monkeypatch, tmp_path, capsys):
    """A later process loads the library its key's directory holds: no build, no notice, no ninja (which
    would rebuild for the same sources at another path)."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("LLMCTL_NATIVE", "1")
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags : avx2 fma")
    monkeypatch.setattr(native, "_loaded", lambda torch: False)
    monkeypatch.setattr(native, "_register_fakes", lambda torch: None)
    build = tmp_path / "key"
    monkeypatch.setattr(native, "build_dir", lambda flags=None: build)
    build.mkdir()
    (build / "llmctl_native_key.so").write_text("")
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("built again"))
    native.ops.cache_clear()
    try:
        assert native.ops() is torch.ops.llmctl
    finally:
        native.ops.cache_clear()
    assert loaded == [str(build / "llmctl_native_key.so")] and capsys.readouterr().err == ""


def test_a_failed_build_warns_once_with_its_first_line(monkeypatch, tmp_path, capsys):
    from torch.utils import cpp_extension

    monkeypatch.setenv("LLMCTL_NATIVE", "1")
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags : avx2 fma")
    monkeypatch.setattr(native, "_loaded", lambda torch: False)
    monkeypatch.setattr(native, "build_dir", lambda flags=None: tmp_path / "cache" / "build")
    calls = []

    def load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("no compiler found\nsecond line")

    monkeypatch.setattr(cpp_extension, "load", load)
    native.ops.cache_clear()
    try:
        assert native.ops() is None and native.ops() is None
    finally:
        native.ops.cache_clear()
    err = capsys.readouterr().err
    assert re.search(r"(^|\s)building llmctl's native CPU kernels \(once per machine and torch version\)…", err)
    assert "native CPU kernels unavailable (RuntimeError: no compiler found); using torch's" in err
    assert "second line" not in err and len(calls) == 1  # once per process
    [kwargs] = calls
    assert kwargs["build_directory"] == str(tmp_path / "cache" / "build") and kwargs["is_python_module"] is False
    assert kwargs["extra_cflags"] == ["-O3", "-march=native", "-fopenmp"]
    assert kwargs["sources"] == [str(native.HERE / "matvec.cpp"), str(native.HERE / "decode.cpp")]
    assert kwargs["name"] == "llmctl_native_build" and kwargs["verbose"] is False
    library = tmp_path / "cache" / "build" / "llmctl_native_build.so"
    library.write_text("")  # a build killed while linking
    native.ops.cache_clear()
    try:
        assert native.ops() is None
    finally:
        native.ops.cache_clear()
    err = capsys.readouterr().err
    assert "building llmctl's native CPU kernels" not in err  # built before: no notice
    assert "unavailable (RuntimeError: no compiler found)" in err and len(calls) == 2  # the directory is reused
    assert not library.exists()  # it did not load: removed, so that the build relinks it

    def silent(**kwargs):
        raise RuntimeError()

    monkeypatch.setattr(cpp_extension, "load", silent)
    native.ops.cache_clear()
    try:
        assert native.ops() is None
    finally:
        native.ops.cache_clear()
    assert "native CPU kernels unavailable (RuntimeError: ); using torch's" in capsys.readouterr().err


def test_the_build_lock_is_held_and_clears_a_stale_torch_lock(tmp_path):
    (tmp_path / "lock").write_text("")
    with native._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
        with open(tmp_path / ".llmctl-build.lock") as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / ".llmctl-build.lock") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
    with native._build_lock(tmp_path):  # no stale lock: fine too
        pass


def test_loaded_and_has_read_the_librarys_capabilities(monkeypatch):
    from types import SimpleNamespace

    def fake(**llmctl):
        return SimpleNamespace(ops=SimpleNamespace(**llmctl))

    assert native._loaded(fake(llmctl=SimpleNamespace(capabilities=object()))) is True
    assert native._loaded(fake(llmctl=SimpleNamespace(capabilities=None))) is False
    assert native._loaded(fake()) is False  # no llmctl library yet

    class Unregistered:
        @property
        def capabilities(self):
            raise RuntimeError("no such operator llmctl::capabilities")

    assert native._loaded(fake(llmctl=Unregistered())) is False
    monkeypatch.setattr(native, "ops", lambda: SimpleNamespace(capabilities=lambda: native.F32 | native.BF16))
    assert [native.has(c) for c in (native.F32, native.BF16, native.QUANT)] == [True, True, False]
    monkeypatch.setattr(native, "ops", lambda: None)
    assert native.has(native.F32) is False
