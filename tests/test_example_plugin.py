"""The example plugin package installs with pip and runs through `llmctl`."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from conftest import ROOT, pythonpath, run_process

PLUGIN = ROOT / "plugins" / "llmctl-corpus-stats"


def _tree(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The plugin installed into a temporary directory, built from a temporary copy of its
    source (pip builds in the source directory: build/, *.egg-info)."""
    import shutil

    before = _tree(PLUGIN)
    source = tmp_path_factory.mktemp("plugin-src") / PLUGIN.name
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("plugin-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True, capture_output=True,
    )
    assert _tree(PLUGIN) == before  # nothing written into the source tree
    return target


def test_installed_plugin_is_listed_and_runs(site, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("The cat sat.\nThe dog ran.\n\nÜber alles, the end.\n", encoding="utf-8")
    env = {"PYTHONPATH": pythonpath(site)}
    listing = json.loads(run_process("plugins", "--json", env=env).stdout)
    entry = next(p for p in listing if p["name"] == "corpus-stats")
    assert entry["distribution"] == "llmctl-corpus-stats" and not entry["builtin"] and entry["status"] == "ok"

    r = run_process("corpus-stats", corpus, "--top", "2", "--json", env=env)
    assert r.code == 0, r.stderr
    [stats] = json.loads(r.stdout)
    assert stats["documents"] == 2 and stats["lines"] == 4 and stats["words"] == 10
    assert stats["bytes"] == corpus.stat().st_size
    assert stats["characters"] == len("The cat sat.The dog ran.Über alles, the end.")
    assert stats["top_words"][0] == ["the", 3]

    missing = run_process("corpus-stats", tmp_path / "nope.txt", env=env)
    assert missing.code == 1 and "nope.txt: no such file" in missing.stderr


def test_stream_formats_and_bounded_table(site, tmp_path):
    sys.path.insert(0, str(site))
    try:
        from llmctl_corpus_stats.stats import scan
    finally:
        sys.path.pop(0)
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"common word{i}"}) + "\n")
    stats = scan(str(path), capacity=50)
    assert stats.documents == 200 and stats.words == 400
    assert stats.top(1) == [("common", 200)]
    assert stats.approximate and len(stats.counts) <= 50
