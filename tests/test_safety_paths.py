"""Never run a user's data as code, never read outside a directory: templates and paths (issue 14)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from _safety import make_workspace, one_line_error, snapshot, write_json

PAYLOAD = "{{ cycler.__init__.__globals__.os.popen('touch %s').read() }}"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    return make_workspace(tmp_path_factory.mktemp("ws"))


def test_task_templates_render_in_the_sandbox(llmctl, ws, tmp_path):
    pwned = tmp_path / "PWNED"
    (tmp_path / "docs.jsonl").write_text(json.dumps({"q": "2+2", "choices": ["4", "5"], "answer": 0}) + "\n")
    (tmp_path / "task.yaml").write_text(
        "name: evil\ntype: multiple_choice\ndataset:\n  path: docs.jsonl\n"
        f"prompt: \"{PAYLOAD % pwned}\"\nchoices: choices\ngold: answer\n")
    r = llmctl("eval", ws["ckpt"], "--task", tmp_path / "task.yaml", "--no-record")
    one_line_error(r, 2, "unsafe")
    assert not pwned.exists()


def test_chat_templates_render_in_the_sandbox(tmp_path):
    from llmctl.core.chat_templates import render_chat
    from llmctl.errors import UsageError

    pwned = tmp_path / "PWNED"
    with pytest.raises(UsageError):
        render_chat("{% for m in messages %}" + PAYLOAD % pwned + "{% endfor %}", [{"role": "user", "content": "x"}],
                    {})
    assert not pwned.exists()


def test_set_template_accepts_only_chat_templates(llmctl, ws, tmp_path):
    tok = tmp_path / "tok"
    shutil.copytree(ws["tok"], tok)
    before = snapshot(tok)
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    one_line_error(llmctl("tokenize", "set-template", tok, passwd), 2, "not a Jinja chat template")
    binary = tmp_path / "blob.jinja"
    binary.write_bytes(bytes(range(256)))
    one_line_error(llmctl("tokenize", "set-template", tok, binary), 2, "not UTF-8")
    one_line_error(llmctl("tokenize", "set-template", tok, "chatmel"), 2, "did you mean")
    assert snapshot(tok) == before
    good = tmp_path / "mine.jinja"
    good.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert llmctl("tokenize", "set-template", tok, good).code == 0
    assert "m['role']" in json.loads((tok / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.parametrize("name", ["../outside.safetensors", "/abs/outside.safetensors"])
def test_index_entries_must_stay_in_the_checkpoint(llmctl, ws, tmp_path, name):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ws["ckpt"], ckpt)
    shutil.move(ckpt / "model.safetensors", tmp_path / "outside.safetensors")
    if name.startswith("/"):
        name = str(tmp_path / "outside.safetensors")
    from llmctl.core.checkpoint import read_safetensors_header

    header, _ = read_safetensors_header(tmp_path / "outside.safetensors")
    write_json(ckpt / "model.safetensors.index.json",
               {"metadata": {}, "weight_map": {k: name for k in header if k != "__metadata__"}})
    for args in (("info", ckpt), ("generate", ckpt, "hi", "-n", "1"),
                 ("eval", ckpt, "--task", "perplexity", "--data", ws["text"], "--no-record")):
        one_line_error(llmctl(*args), 1, "points outside")


@pytest.mark.parametrize("field,value", [("file", "../../corpus.txt"), ("file", "/etc/hostname"),
                                         ("tokenizer", "../tok")])
def test_manifest_paths_must_stay_in_the_shard_directory(llmctl, ws, tmp_path, field, value):
    shards = tmp_path / "shards"
    shutil.copytree(ws["shards"], shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    if field == "file":
        manifest["splits"]["train"]["shards"][0]["file"] = value
    else:
        manifest["tokenizer"] = value
    write_json(shards / "manifest.json", manifest)
    one_line_error(llmctl("tokenize", "decode", "-t", ws["tok"], "--shard", shards), 1, "points outside")
    one_line_error(llmctl("train", "model=nano", f"data={shards}", "max_steps=1", "-o", tmp_path / "out"), 2,
                   "points outside")
    assert not (tmp_path / "out").exists()
