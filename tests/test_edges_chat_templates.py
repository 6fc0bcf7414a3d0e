"""Round 10 edges: chat templates (`core/chat_templates.py`) render as transformers'
`apply_chat_template` does, template files are checked before use, and the built-ins."""

from __future__ import annotations

from datetime import datetime

import pytest
import transformers
from tokenizers import Tokenizer, models

from llmctl.core import chat_templates as ct
from llmctl.core.chat_templates import (
    CHAT_TEMPLATES, end_of_turn_tokens, render_chat, resolve_template,
)
from llmctl.errors import UsageError

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# whitespace around indented block tags (trim_blocks, lstrip_blocks), loop controls, the
# generation block, tojson's arguments, None-valued keys, tools, documents and extra variables
TRICKY = """\
{%- for m in messages %}
    {%- if m.role == 'skip' %}{% continue %}{% endif %}
    {%- if loop.index > 5 %}{% break %}{% endif %}
    <{{ m.role }}>{% if m.name is defined %}({{ m.name }}){% endif %}
    {% generation %}{{ m.content }}{% endgeneration %}
{% endfor %}
  {% if tools %}
TOOLS {{ tools | tojson }}|{{ tools | tojson(indent=2, sort_keys=True) }}|{{ tools | tojson(separators=(',', ':')) }}
  {% endif %}
{% if documents %}DOCS {{ documents | length }} {{ documents[0].title }}{% endif %}
{% if add_generation_prompt %}<go>{% endif %}{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ extra }}|
{{- strftime_now("%Y") }}
"""

MESSAGES = [{"role": "system", "content": "Be brief.", "name": None},
            {"role": "skip", "content": "hidden"},
            {"role": "user", "content": "Café?", "name": "ana"},
            {"role": "assistant", "content": "Oui.", "tool_calls": None},
            {"role": "user", "content": "more"},
            {"role": "user", "content": "five"},
            {"role": "user", "content": "beyond five"}]
TOOLS = [{"type": "function", "function": {"name": "météo", "parameters": {"b": 1, "a": [1, 2]}}}]


def _hf(template: str):
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")),
                                               **SPECIAL)
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [True, False])
def test_a_tricky_template_renders_as_transformers(generation_prompt, with_tools):
    more = {"tools": TOOLS, "documents": [{"title": "T", "text": "x"}]} if with_tools else {}
    ours = render_chat(TRICKY, MESSAGES, SPECIAL, add_generation_prompt=generation_prompt, extra="E", **more)
    theirs = _hf(TRICKY).apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt,
                                             extra="E", **more)
    assert ours == theirs
    assert ("<go>" in ours) == generation_prompt and ("météo" in ours) == with_tools
    assert ours.endswith(f"<s>|</s>|<unk>|E|{datetime.now().year}") and "beyond" not in ours and "hidden" not in ours


def test_render_defaults_and_messages_left_unchanged():
    template = "{% for m in messages %}{{ m.role }}{{ m.keys() | list | length }};{% endfor %}" \
               "{{ tools is none }}{{ documents is none }}{{ add_generation_prompt }}"
    messages = [{"role": "user", "content": "hi", "extra": None}]
    assert render_chat(template, messages, {}) == "user2;TrueTrueTrue"
    assert messages == [{"role": "user", "content": "hi", "extra": None}]
    assert render_chat(template, messages, {}, add_generation_prompt=False).endswith("False")
    assert render_chat("{{ bos_token }}", [], {"bos_token": "<s>"}, bos_token="<b>") == "<b>"  # kwargs win


def test_errors_raised_by_a_template_or_its_syntax_are_one_line_usage_errors():
    raising = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}"
    with pytest.raises(UsageError, match="^chat template: Conversation must start with user$"):
        render_chat(raising, [{"role": "system", "content": "x"}], {})
    with pytest.raises(Exception, match="Conversation must start with user"):
        _hf(raising).apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)
    with pytest.raises(UsageError, match=r"^chat template: Jinja syntax error on line 2: "):
        render_chat("{% for m in messages %}\n{% endfor %}{% if %}", [], {})
    with pytest.raises(UsageError, match="^chat template: .*unsafe|^chat template: access to attribute"):
        render_chat("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [], {})


def test_template_files_are_checked_before_use(tmp_path, monkeypatch):
    good = tmp_path / "t.jinja"
    good.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert resolve_template(str(good)) == (good.read_text(), ())
    odd = tmp_path / "template.txt"  # any existing file, whatever its suffix
    odd.write_text("{{ messages | length }}")
    assert resolve_template(str(odd)) == ("{{ messages | length }}", ())

    def refused(path, message):
        with pytest.raises(UsageError) as e:
            resolve_template(str(path))
        assert str(e.value) == message

    names = ", ".join(CHAT_TEMPLATES.names())
    plain = tmp_path / "plain.jinja"
    plain.write_text("messages, but no Jinja")
    refused(plain, f"chat template {plain}: not a Jinja chat template (it never uses 'messages'); give a .jinja "
                   f"file or one of: {names}")
    nomsg = tmp_path / "nomsg.j2"
    nomsg.write_text("{{ bos_token }}")
    refused(nomsg, f"chat template {nomsg}: not a Jinja chat template (it never uses 'messages'); give a .jinja "
                   f"file or one of: {names}")
    for source in ("{% for m in messages %}", "{{ messages "):
        broken = tmp_path / "broken.jinja"
        broken.write_text(source)
        with pytest.raises(UsageError, match=r"^chat template: Jinja syntax error on line 1: "):
            resolve_template(str(broken))
    binary = tmp_path / "bin.jinja"
    binary.write_bytes(b"{{ messages }}\xff\xfe")
    refused(binary, f"chat template {binary}: not UTF-8 text, so not a Jinja chat template")
    refused(tmp_path / "missing.jinja", f"chat template {tmp_path / 'missing.jinja'}: cannot read (No such file or "
                                        "directory)")
    refused(tmp_path / "missing.j2", f"chat template {tmp_path / 'missing.j2'}: cannot read (No such file or "
                                     "directory)")  # a template's suffix: a file, not a name
    folder = tmp_path / "dir.jinja"
    folder.mkdir()
    refused(folder, f"chat template {folder}: cannot read (Is a directory)")
    monkeypatch.setattr(ct, "MAX_TEMPLATE_BYTES", good.stat().st_size)
    assert resolve_template(str(good))[0] == good.read_text()  # exactly the limit: fine
    monkeypatch.setattr(ct, "MAX_TEMPLATE_BYTES", (good.stat().st_size - 1) | (2 << 20))
    big = tmp_path / "big.jinja"
    big.write_text(" " * ((2 << 20) + good.stat().st_size) + "{{ messages }}")
    refused(big, f"chat template {big}: over 2 MiB, not a chat template")


def test_built_in_templates_and_their_end_of_turn_tokens(tmp_path, monkeypatch):
    source, tokens = resolve_template("chatml")
    assert tokens == ("<|im_start|>", "<|im_end|>")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " yes "}]
    assert render_chat(source, messages, {}) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n yes " \
                                                "<|im_end|>\n<|im_start|>assistant\n"
    llama3, tokens = resolve_template("llama3")
    assert tokens[-1] == "<|eot_id|>"
    assert render_chat(llama3, messages, {}, add_generation_prompt=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant"
        "<|end_header_id|>\n\nyes<|eot_id|>")
    for name in CHAT_TEMPLATES.names():
        source, _ = resolve_template(name)
        assert render_chat(source, messages, {}) == _hf(source).apply_chat_template(messages, tokenize=False,
                                                                                  add_generation_prompt=True)
    assert end_of_turn_tokens() == {CHAT_TEMPLATES.get(n).end_of_turn for n in CHAT_TEMPLATES.names()} \
        >= {"<|im_end|>", "<|eot_id|>"}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chatml").write_text("{{ messages }}")  # a file named like a built-in: the built-in wins
    assert resolve_template("chatml")[1] == ("<|im_start|>", "<|im_end|>")
    with pytest.raises(UsageError, match=r"^unknown chat template 'chatm' \(did you mean 'chatml'\?\)"):
        resolve_template("chatm")
